package cloud

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestExportSinksConfig: export.sinks is read from the YAML file and
// validated with the rest of the configuration, each problem named by its
// key; -check-config's masked copy hides a NATS URL's password.
func TestExportSinksConfig(t *testing.T) {
	write := func(t *testing.T, yaml string) string {
		p := filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	args := func(file string) []string {
		return []string{"-config", file, "-id", "n1", "-data", t.TempDir(), "-development"}
	}
	noenv := func(string) string { return "" }

	good := write(t, `export:
  sinks:
    - {name: js, type: nats, url: "nats://u:hunter2@127.0.0.1:4222", subject: outpost.export}
    - {name: lake, type: kafka, brokers: ["127.0.0.1:9092"], topic: outpost-export}
`)
	cfg, err := parse(args(good), io.Discard, noenv)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Export.Sinks) != 2 || cfg.Export.Sinks[1].Topic != "outpost-export" || cfg.Export.Batch != 512 {
		t.Fatalf("export %+v", cfg.Export)
	}
	if m := cfg.Masked(); strings.Contains(m.Export.Sinks[0].URL, "hunter2") || !strings.Contains(cfg.Export.Sinks[0].URL, "hunter2") {
		t.Fatalf("masked %q, config %q", m.Export.Sinks[0].URL, cfg.Export.Sinks[0].URL)
	}

	bad := write(t, `export:
  sinks:
    - {name: lake, type: kafka, brokers: ["127.0.0.1:9092"]}
    - {name: lake, type: nats, subject: "a.*"}
`)
	_, err = parse(args(bad), io.Discard, noenv)
	var ue usageErrors
	if !errors.Is(err, ErrUsage) || !errors.As(err, &ue) {
		t.Fatalf("err %v", err)
	}
	var keys []string
	for _, p := range ue.Errors {
		keys = append(keys, p.Key)
	}
	want := "export.sinks[0].topic,export.sinks[1].name,export.sinks[1].url,export.sinks[1].subject"
	if strings.Join(keys, ",") != want {
		t.Fatalf("problems %v, want keys %s", ue, want)
	}
	unknown := write(t, "export:\n  sinks:\n    - {name: x, type: nats, urls: nats://h:1}\n")
	if _, err := parse(args(unknown), io.Discard, noenv); !errors.Is(err, ErrUsage) {
		t.Fatalf("an unknown sink key: %v", err)
	}
}
