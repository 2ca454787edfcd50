package obs

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
)

// TestSecurityPprofCmdline: Low finding "Unauthenticated information":
// pprof's cmdline showed tokens passed as flags. The admin listener serves
// the program name only.
func TestSecurityPprofCmdline(t *testing.T) {
	const secret = "s3cret-token-from-a-flag"
	args := os.Args
	os.Args = append(slices.Clone(args), "-api-token", secret, "-edge-token=e1="+secret, "--cloud-token="+secret, "-"+secret)
	t.Cleanup(func() { os.Args = args })

	a, err := ListenAdmin("127.0.0.1:0", nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	resp, err := http.Get("http://" + a.Addr() + "/debug/pprof/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("cmdline: %d", resp.StatusCode)
	}
	got := strings.Split(string(b), "\x00")
	if strings.Contains(string(b), secret) || len(got) != len(os.Args) || got[0] != os.Args[0] {
		t.Fatalf("cmdline %q: want the program name and every argument redacted", b)
	}
	for _, arg := range got[1:] {
		if arg != "<redacted>" {
			t.Fatalf("cmdline shows argument %q", arg)
		}
	}
	// The rest of pprof is still there.
	if resp, err := http.Get("http://" + a.Addr() + "/debug/pprof/goroutine?debug=1"); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("goroutine profile: %v", err)
	} else {
		resp.Body.Close()
	}
}
