package cloud

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/pkg/config"
)

// Tokens long enough for the 32-character minimum.
const (
	goodAPI  = "api-0123456789abcdef0123456789abcdef"
	goodEdge = "edge-0123456789abcdef0123456789abcdef"
)

var base = []string{"-id", "n1", "-data", "d", "-bootstrap"}

func noEnv(string) string { return "" }

func env(kv ...string) func(string) string {
	return func(k string) string {
		for i := 0; i+1 < len(kv); i += 2 {
			if kv[i] == k {
				return kv[i+1]
			}
		}
		return ""
	}
}

func writeFile(t *testing.T, dir, name, body string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(body), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // past the umask
		t.Fatal(err)
	}
	return p
}

// problemKeys returns the keys config.Errors names, or fails.
func problemKeys(t *testing.T, err error) []string {
	t.Helper()
	var errs usageErrors
	if !errors.As(err, &errs) || !errors.Is(err, ErrUsage) || !errors.Is(err, config.ErrInvalid) {
		t.Fatalf("err = %v, want config problems (usage, exit 2)", err)
	}
	var keys []string
	for _, p := range errs.Errors {
		keys = append(keys, p.Key)
	}
	return keys
}

// TestSecurityPlaceholderSecretRefused: finding 10, the shipped configs
// worked as credentials (configs/cloud-sync.yaml's dev-api-token-change-me
// opened the export). A credential holding the change-me placeholder, in
// any case, is refused outside development, named by its key; in
// development it is accepted and announced.
func TestSecurityPlaceholderSecretRefused(t *testing.T) {
	tests := []struct {
		name string
		args []string
		key  string
	}{
		{"api token", []string{"-api-token", "dev-api-token-change-me-0123456789abcdef"}, "api_token"},
		{"edge token", []string{"-edge-token", "e1=CHANGE-ME-edge-token-0123456789abcdef"}, "edge_tokens.e1"},
		{"wechat secret", []string{"-wechat-appid", "wx", "-wechat-secret", "Change-Me"}, "wechat_secret"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parse(append(append([]string{}, base...), tt.args...), io.Discard, noEnv)
			keys := problemKeys(t, err)
			if len(keys) != 1 || keys[0] != tt.key || !strings.Contains(err.Error(), "placeholder") {
				t.Fatalf("problems %q (%v), want one about the placeholder under %s", keys, err, tt.key)
			}
			cfg, err := parse(append(append([]string{"-development"}, base...), tt.args...), io.Discard, noEnv)
			if err != nil {
				t.Fatalf("in development: %v", err)
			}
			if !hasNotice(cfg.Notices(), tt.key, "placeholder") {
				t.Fatalf("development does not announce the placeholder: %v", cfg.Notices())
			}
		})
	}
	// The development config is the one place placeholders live.
	cfg, err := parse([]string{"-config", "../../configs/dev/cloud-sync.yaml"}, io.Discard, noEnv)
	if err != nil || !cfg.Development {
		t.Fatalf("configs/dev/cloud-sync.yaml: development=%v err=%v", cfg.Development, err)
	}
	for _, key := range []string{"development", "dev_login", "admins", "api_token", "edge_tokens.edge-1"} {
		if !hasNotice(cfg.Notices(), key, "") {
			t.Errorf("the development config does not announce %s: %v", key, cfg.Notices())
		}
	}
}

// TestSecurityShortTokenRefused: Low finding "Cloud credentials: 8-character
// tokens are accepted". Outside development every token needs
// config.MinTokenLen characters: at the online guessing rate the throttle
// leaves (10/s per address) a 32-character token is out of reach, an
// 8-character one from a small alphabet is not. Development accepts and
// announces short ones, so quick local setups keep working.
func TestSecurityShortTokenRefused(t *testing.T) {
	for _, tt := range []struct {
		args []string
		key  string
	}{
		{[]string{"-api-token", "abcdefgh"}, "api_token"},
		{[]string{"-edge-token", "e1=abcdefgh", "-api-token", goodAPI}, "edge_tokens.e1"},
		{[]string{"-api-token", strings.Repeat("x", config.MinTokenLen-1)}, "api_token"},
	} {
		_, err := parse(append(append([]string{}, base...), tt.args...), io.Discard, noEnv)
		if keys := problemKeys(t, err); len(keys) != 1 || keys[0] != tt.key || !strings.Contains(err.Error(), "fewer than the 32 required") {
			t.Errorf("%q: problems %q (%v), want one under %s", tt.args, keys, err, tt.key)
		}
		cfg, err := parse(append(append([]string{"-development"}, base...), tt.args...), io.Discard, noEnv)
		if err != nil || !hasNotice(cfg.Notices(), tt.key, "characters") {
			t.Errorf("%q in development: err=%v notices=%v, want accepted and announced", tt.args, err, cfg.Notices())
		}
	}
	if _, err := parse(append(append([]string{}, base...), "-api-token", strings.Repeat("x", config.MinTokenLen)), io.Discard, noEnv); err != nil {
		t.Fatalf("a %d-character token: %v", config.MinTokenLen, err)
	}
}

// TestSecurityCredentialSources: issue 11 item 5, credentials from files or
// the environment so they stay out of argv. Files are read at start
// (trailing newline trimmed), the environment wins over the config file and
// loses to flags, both forms at one level are refused, a world-readable
// file is warned about, and -check-config's printout masks what they hold.
func TestSecurityCredentialSources(t *testing.T) {
	dir := t.TempDir()
	apiFile := writeFile(t, dir, "api-token", goodAPI+"\n", 0o600)
	openFile := writeFile(t, dir, "open-token", goodAPI+"\r\n", 0o644)
	lines := writeFile(t, dir, "edges.txt", "# edge tokens\ne1="+goodEdge+"\n\ne2=x"+goodEdge+"\n", 0o600)
	yamlMap := writeFile(t, dir, "edges.yaml", "e1: "+goodEdge+"\ne2: x"+goodEdge+"\n", 0o600)
	secretDir := filepath.Join(dir, "secret")
	writeFile(t, secretDir, "e1", goodEdge+"\n", 0o440)
	writeFile(t, secretDir, "e2", "x"+goodEdge, 0o440)
	writeFile(t, secretDir, "..data/ignored", "not an edge", 0o440) // a Secret volume's own links
	fileCfg := writeFile(t, dir, "c.yaml", "api_token_file: "+apiFile+"\nedge_tokens_file: "+lines+"\n", 0o600)
	bothCfg := writeFile(t, dir, "both.yaml", "api_token: "+goodAPI+"\napi_token_file: "+apiFile+"\n", 0o600)
	twice := writeFile(t, dir, "twice.yaml", "edge_tokens: {e1: "+goodEdge+"}\nedge_tokens_file: "+lines+"\n", 0o600)
	empty := writeFile(t, dir, "empty", "\n", 0o600)

	wantEdges := map[string]string{"e1": goodEdge, "e2": "x" + goodEdge}
	tests := []struct {
		name   string
		args   []string
		getenv func(string) string
		api    string
		edges  map[string]string
		notice string // a notice naming this key
	}{
		{"api token file", []string{"-api-token-file", apiFile}, noEnv, goodAPI, nil, ""},
		{"world-readable file", []string{"-api-token-file", openFile}, noEnv, goodAPI, nil, "api_token_file"},
		{"edge tokens as lines", []string{"-edge-tokens-file", lines}, noEnv, "", wantEdges, ""},
		{"edge tokens as YAML", []string{"-edge-tokens-file", yamlMap}, noEnv, "", wantEdges, ""},
		{"edge tokens as a Secret directory", []string{"-edge-tokens-file", secretDir}, noEnv, "", wantEdges, ""},
		{"files named in the config file", []string{"-config", fileCfg}, noEnv, goodAPI, wantEdges, ""},
		{"environment", nil, env(EnvAPIToken, goodAPI, EnvEdgeTokens, "e1="+goodEdge+",e2=x"+goodEdge), goodAPI, wantEdges, ""},
		{"environment over the config file", []string{"-config", fileCfg}, env(EnvAPIToken, "env-"+goodAPI), "env-" + goodAPI, wantEdges, ""},
		{"flag over the environment", []string{"-api-token", "flag-" + goodAPI}, env(EnvAPIToken, "env-"+goodAPI), "flag-" + goodAPI, nil, ""},
		{"-edge-token replaces the config file's", []string{"-config", fileCfg, "-edge-token", "e9=" + goodEdge}, noEnv, goodAPI, map[string]string{"e9": goodEdge}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := parse(append(append([]string{}, base...), tt.args...), io.Discard, tt.getenv)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.APIToken != tt.api {
				t.Errorf("api token %q, want %q", cfg.APIToken, tt.api)
			}
			if tt.edges != nil && !mapsEqual(cfg.EdgeTokens, tt.edges) {
				t.Errorf("edge tokens %v, want %v", cfg.EdgeTokens, tt.edges)
			}
			if got := hasNotice(cfg.Notices(), tt.notice, "readable by every user"); got != (tt.notice != "") {
				t.Errorf("notices %v, want a world-readable warning: %v", cfg.Notices(), tt.notice != "")
			}
			var out strings.Builder
			if err := config.Print(&out, cfg.Masked()); err != nil {
				t.Fatal(err)
			}
			if strings.Contains(out.String(), goodAPI) || strings.Contains(out.String(), goodEdge) {
				t.Errorf("the printed configuration shows a token:\n%s", out.String())
			}
		})
	}
	for _, tt := range []struct {
		name string
		args []string
		key  string
	}{
		{"value and file flags", []string{"-api-token", goodAPI, "-api-token-file", apiFile}, "api_token"},
		{"value and file keys", []string{"-config", bothCfg}, "api_token"},
		{"missing file", []string{"-api-token-file", filepath.Join(dir, "none")}, "api_token_file"},
		{"empty file", []string{"-api-token-file", empty}, "api_token_file"},
		{"an edge in the map and the file", []string{"-config", twice}, "edge_tokens_file"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parse(append(append([]string{}, base...), tt.args...), io.Discard, noEnv)
			if keys := problemKeys(t, err); len(keys) != 1 || keys[0] != tt.key {
				t.Fatalf("problems %q (%v), want one under %s", keys, err, tt.key)
			}
		})
	}
}

func hasNotice(ns []config.Notice, key, text string) bool {
	for _, n := range ns {
		if n.Key == key && strings.Contains(n.Msg, text) {
			return true
		}
	}
	return false
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}
