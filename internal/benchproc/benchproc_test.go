package benchproc

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"
	"time"
)

func TestParseStatus(t *testing.T) {
	got := parseStatus("Name:\tedge\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\nRssAnon:\t     512 kB\nThreads:\t7\n")
	want := map[string]float64{"VmHWM": 2, "VmRSS": 1, "RssAnon": 0.5}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
}

func TestStatusMBSelf(t *testing.T) {
	if _, err := os.Stat("/proc/self/status"); err != nil {
		t.Skip("no /proc")
	}
	if rss := StatusMB(os.Getpid())["VmRSS"]; rss <= 0 {
		t.Fatalf("VmRSS of this process = %v", rss)
	}
	if m := StatusMB(-1); len(m) != 0 {
		t.Fatalf("missing process: %v", m)
	}
}

func TestWaitHTTP(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
	if err := WaitHTTP(context.Background(), srv.URL, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := WaitHTTP(context.Background(), "http://"+FreeAddr(), 100*time.Millisecond); err == nil {
		t.Fatal("a closed port answered")
	}
}
