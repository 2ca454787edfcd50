package edge

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/pkg/config"
)

const goodToken = "edge-0123456789abcdef0123456789abcdef"

func noEnv(string) string { return "" }

// TestSecurityEdgeCredentials: finding 10 (placeholder secrets worked as
// credentials), the Low finding "8-character tokens are accepted", and item
// 5 (credentials from files or the environment, out of argv), at the edge:
// its cloud token comes from -cloud-token-file, cloud.token_file or
// $OUTPOST_CLOUD_TOKEN; a change-me or short token is refused outside
// development, named by its key; the development config is accepted and
// announces its conveniences.
func TestSecurityEdgeCredentials(t *testing.T) {
	dir := t.TempDir()
	file := func(name, body string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tokFile := file("cloud-token", goodToken+"\n", 0o600)
	cfgFile := file("e.yaml", "cloud: {urls: [\"http://c\"], token_file: "+tokFile+"}\n", 0o600)
	placeholder := file("placeholder", "dev-edge-1-token-change-me\n", 0o600)
	base := []string{"-id", "e1", "-cloud", "http://c"}

	for _, tt := range []struct {
		name   string
		args   []string
		getenv func(string) string
		want   string
	}{
		{"flag file", []string{"-cloud-token-file", tokFile}, noEnv, goodToken},
		{"config file's token_file", []string{"-config", cfgFile}, noEnv, goodToken},
		{"environment", nil, func(k string) string {
			if k == EnvCloudToken {
				return "env-" + goodToken
			}
			return ""
		}, "env-" + goodToken},
		{"flag over the config file", []string{"-config", cfgFile, "-cloud-token", "flag-" + goodToken}, noEnv, "flag-" + goodToken},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := parse(append(append([]string{}, base...), tt.args...), io.Discard, tt.getenv)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Cloud.Token != tt.want {
				t.Fatalf("token %q, want %q", cfg.Cloud.Token, tt.want)
			}
			var out strings.Builder
			if err := config.Print(&out, cfg.Masked()); err != nil {
				t.Fatal(err)
			}
			if strings.Contains(out.String(), goodToken) {
				t.Fatalf("the printed configuration shows the token:\n%s", out.String())
			}
		})
	}

	for _, tt := range []struct {
		name, key, msg string
		args           []string
	}{
		{"placeholder", "cloud.token", "placeholder", []string{"-cloud-token-file", placeholder}},
		{"short", "cloud.token", "fewer than the 32 required", []string{"-cloud-token", "abcdefgh"}},
		{"both forms", "cloud.token", "mutually exclusive", []string{"-cloud-token", goodToken, "-cloud-token-file", tokFile}},
		{"missing file", "cloud.token_file", "no such file", []string{"-cloud-token-file", filepath.Join(dir, "none")}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parse(append(append([]string{}, base...), tt.args...), io.Discard, noEnv)
			var errs config.Errors
			if !errors.As(err, &errs) || len(errs) != 1 || errs[0].Key != tt.key || !strings.Contains(errs[0].Msg, tt.msg) {
				t.Fatalf("err = %v, want one problem under %s mentioning %q", err, tt.key, tt.msg)
			}
		})
	}

	// Development accepts the placeholder and says so, with the rest of its
	// conveniences.
	cfg, err := parse([]string{"-config", "../../configs/dev/edge.yaml", "-cloud", "http://c", "-cloud-token-file", placeholder}, io.Discard, noEnv)
	if err != nil {
		t.Fatalf("development config with a placeholder token: %v", err)
	}
	got := map[string]bool{}
	for _, n := range cfg.Notices() {
		got[n.Key] = true
	}
	for _, key := range []string{"development", "dev_login", "admins", "mqtt.devices", "cloud.token"} {
		if !got[key] {
			t.Errorf("the development config does not announce %s: %v", key, cfg.Notices())
		}
	}
}
