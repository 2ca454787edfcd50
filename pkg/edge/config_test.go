package edge

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/config"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "edge.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestParsePrecedence(t *testing.T) {
	file := writeConfig(t, "id: from-file\nregion: north\nhttp: \":9000\"\ncloud:\n  urls: [\"http://c1\"]\n  token: t-0123456789abcdef0123456789abcdef\ningest:\n  linger: 2ms\n")
	tests := []struct {
		name  string
		args  []string
		check func(t *testing.T, c Config)
	}{
		{"defaults", []string{"-id", "e1"}, func(t *testing.T, c Config) {
			if c.HTTP != ":8080" || c.MQTT.Listen != ":1883" || c.DataDir != "./data" || c.Region != "default" {
				t.Errorf("defaults not applied: %+v", c)
			}
		}},
		{"file overrides defaults", []string{"-config", file}, func(t *testing.T, c Config) {
			if c.ID != "from-file" || c.Region != "north" || c.HTTP != ":9000" || c.Ingest.Linger != 2*time.Millisecond {
				t.Errorf("file not applied: %+v", c)
			}
			if c.MQTT.Listen != ":1883" {
				t.Errorf("a key absent from the file lost its default: %q", c.MQTT.Listen)
			}
		}},
		{"flags override the file, before or after -config", []string{"-region", "south", "-config", file, "-http", ":7000", "-cloud", "http://a, http://b"}, func(t *testing.T, c Config) {
			if c.Region != "south" || c.HTTP != ":7000" || c.ID != "from-file" {
				t.Errorf("flags did not override: %+v", c)
			}
			if strings.Join(c.Cloud.URLs, "|") != "http://a|http://b" {
				t.Errorf("cloud URLs %q", c.Cloud.URLs)
			}
		}},
		{"-config=path form", []string{"-config=" + file}, func(t *testing.T, c Config) {
			if c.ID != "from-file" {
				t.Errorf("-config=path not loaded: %q", c.ID)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse(tt.args, io.Discard)
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.args, err)
			}
			tt.check(t, c)
		})
	}
}

func TestParseErrors(t *testing.T) {
	unknown := writeConfig(t, "id: e1\nregoin: typo\n")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"unknown key in file", []string{"-config", unknown}, "regoin"},
		{"missing file", []string{"-config", "/nonexistent/edge.yaml"}, "read config"},
		{"bad id", []string{"-id", "a/b"}, "id"},
		{"bad location", []string{"-id", "e1", "-location", "north"}, "location"},
		{"cloud without token", []string{"-id", "e1", "-cloud", "http://c"}, "cloud token"},
		{"external broker not a URL", []string{"-id", "e1", "-mqtt-broker", "localhost:1883"}, "tcp://"},
		{"unknown flag", []string{"-nope"}, "not defined"},
		{"stray argument", []string{"-id", "e1", "extra"}, "unexpected arguments"},
		{"bad log level", []string{"-id", "e1", "-log-level", "loud"}, "log level"},
		{"trusted proxy not an address", []string{"-id", "e1", "-api-trusted-proxies", "10.0.0.0/8,proxy.local"}, "api.trusted_proxies"},
		{"per-IP cap over the total", []string{"-id", "e1", "-api-max-conns", "10", "-api-max-conns-per-ip", "11"}, "api.max_conns_per_ip"},
		{"negative cap", []string{"-id", "e1", "-api-max-conns", "-1"}, "api.max_conns"},
		{"negative gc_percent", []string{"-id", "e1", "-config", writeConfig(t, "gc_percent: -5\n")}, "gc_percent"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse(tt.args, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Parse(%q) = %v, want an error mentioning %q", tt.args, err, tt.want)
			}
		})
	}
	var out strings.Builder
	if _, err := Parse([]string{"-h"}, &out); !errors.Is(err, ErrHelp) {
		t.Fatalf("-h: %v, want ErrHelp", err)
	}
	for _, flag := range []string{"-config", "-id", "-data", "-http", "-mqtt-listen", "-mqtt-broker", "-cloud", "-cloud-token", "-region", "-location", "-advertise", "-admin", "-dev-login"} {
		if !strings.Contains(out.String(), flag+" ") && !strings.Contains(out.String(), flag+"\n") {
			t.Errorf("-h does not document %s", flag)
		}
	}
}

// TestShippedConfigLoads keeps the production example and the development
// config in step with the struct.
func TestShippedConfigLoads(t *testing.T) {
	for _, f := range []string{"../../configs/edge.yaml", "../../configs/dev/edge.yaml"} {
		if _, err := Parse([]string{"-config", f}, io.Discard); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
	}
}

// TestShippedConfigIsTheDefaults: configs/edge.yaml (the production
// example) shows the built-in defaults ("what is left out takes the
// built-in default shown here"), so apart from its id, loading it changes
// nothing: no dev login, no admins. A default changed in a component but not in the file (or
// the other way round) fails here.
func TestShippedConfigIsTheDefaults(t *testing.T) {
	got := DefaultConfig()
	if err := config.LoadYAML("../../configs/edge.yaml", &got); err != nil {
		t.Fatal(err)
	}
	want := DefaultConfig()
	want.ID, want.Admins = "edge-1", []string{}
	want.MQTT.Devices, want.Cloud.URLs = map[string]string{}, []string{}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("configs/edge.yaml differs from the defaults:\n file %+v\n code %+v", got, want)
	}
	if got.MemoryLimitMB != 0 {
		t.Fatalf("memory_limit_mb = %d, want 0 (no soft limit unless the operator sets one)", got.MemoryLimitMB)
	}
}

// TestValidateCollectsEveryProblem: every problem is reported, each under
// its key, in one config.Errors.
func TestValidateCollectsEveryProblem(t *testing.T) {
	c := DefaultConfig()
	c.ID, c.HTTP, c.Ingest.QuotaMB, c.Ingest.MaxBatch, c.LogLevel = "a/b", ":x", -1, 0, "loud"
	err := c.Validate()
	var errs config.Errors
	if !errors.As(err, &errs) || !errors.Is(err, config.ErrInvalid) {
		t.Fatalf("Validate = %v, want config.Errors", err)
	}
	var keys []string
	for _, p := range errs {
		keys = append(keys, p.Key)
	}
	if want := []string{"id", "http", "ingest.max_batch", "ingest.quota_mb", "log_level"}; !reflect.DeepEqual(keys, want) {
		t.Fatalf("keys %q, want %q (%v)", keys, want, err)
	}
	if !strings.HasPrefix(err.Error(), "config: 5 errors: id: ") {
		t.Fatalf("message %q", err)
	}
}

// TestShippedConfigDocumentsEveryKey: the README sends operators to
// configs/edge.yaml for every key, so each yaml key of Config appears
// there, set or as a commented example ("key:" at a line's start, after
// any "#").
func TestShippedConfigDocumentsEveryKey(t *testing.T) {
	b, err := os.ReadFile("../../configs/edge.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var missing []string
	var walk func(prefix string, typ reflect.Type)
	walk = func(prefix string, typ reflect.Type) {
		for i := range typ.NumField() {
			f := typ.Field(i)
			key, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if key == "" || key == "-" {
				continue
			}
			re := regexp.MustCompile(`(?m)^[ \t]*(#[ \t]*)?` + regexp.QuoteMeta(key) + `:`)
			if !re.Match(b) {
				missing = append(missing, prefix+key)
			}
			if ft := f.Type; ft.Kind() == reflect.Struct && ft.PkgPath() == typ.PkgPath() {
				walk(prefix+key+".", ft)
			}
		}
	}
	walk("", reflect.TypeFor[Config]())
	if len(missing) > 0 {
		t.Fatalf("configs/edge.yaml does not document %v", missing)
	}
}
