package wechat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeWeChat serves /sns/jscode2session with a canned body and records the
// query of the last request.
type fakeWeChat struct {
	mu     sync.Mutex
	status int
	body   string
	delay  time.Duration
	last   map[string][]string
	path   string
}

func (f *fakeWeChat) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.last = r.URL.Query()
	f.path = r.URL.Path
	status, body, delay := f.status, f.body, f.delay
	f.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
	}
	if status == 0 {
		status = http.StatusOK
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprint(w, body)
}

func newFake(t *testing.T, f *fakeWeChat, timeout time.Duration) *Client {
	t.Helper()
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	c, err := New(Config{APIBase: srv.URL, AppID: "wxapp", Secret: "s3cret", Timeout: timeout, HTTPClient: srv.Client()})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return c
}

func TestCode2SessionSuccessAndQuery(t *testing.T) {
	f := &fakeWeChat{body: `{"openid":"o-123","session_key":"sk-secret","unionid":"u-9"}`}
	c := newFake(t, f, time.Second)
	s, err := c.Code2Session(context.Background(), "code&with=chars")
	if err != nil {
		t.Fatalf("Code2Session: %v", err)
	}
	if s.OpenID != "o-123" || s.UnionID != "u-9" || s.SessionKey != "sk-secret" {
		t.Fatalf("session = %+v", s)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.path != "/sns/jscode2session" {
		t.Errorf("path = %q", f.path)
	}
	want := map[string]string{"appid": "wxapp", "secret": "s3cret", "js_code": "code&with=chars", "grant_type": "authorization_code"}
	for k, v := range want {
		if got := f.last[k]; len(got) != 1 || got[0] != v {
			t.Errorf("query %s = %v, want %q", k, got, v)
		}
	}
}

func TestSessionKeyNeverSerialised(t *testing.T) {
	s := Session{OpenID: "o", UnionID: "u", SessionKey: "sk-secret"}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	var sb strings.Builder
	slog.New(slog.NewJSONHandler(&sb, nil)).Info("login", "session", s)
	for name, out := range map[string]string{"json": string(b), "string": s.String(), "fmt": fmt.Sprintf("%v %+v", s, s), "slog": sb.String()} {
		if strings.Contains(out, "sk-secret") {
			t.Errorf("%s form leaks session key: %s", name, out)
		}
	}
}

func TestCode2SessionErrcodes(t *testing.T) {
	tests := []struct {
		name string
		body string
		want error
	}{
		{"invalid code", `{"errcode":40029,"errmsg":"invalid code"}`, ErrInvalidCode},
		{"rate limited", `{"errcode":45011,"errmsg":"api minute-quota reach limit"}`, ErrRateLimited},
		{"blocked", `{"errcode":40226,"errmsg":"high risk user"}`, ErrBlocked},
		{"busy", `{"errcode":-1,"errmsg":"system error"}`, ErrBusy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newFake(t, &fakeWeChat{body: tt.body}, time.Second)
			_, err := c.Code2Session(context.Background(), "abc")
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestCode2SessionGenericFailures(t *testing.T) {
	sentinels := []error{ErrInvalidCode, ErrRateLimited, ErrBlocked, ErrBusy, ErrUnavailable}
	tests := []struct {
		name    string
		f       *fakeWeChat
		contain string
	}{
		{"other errcode", &fakeWeChat{body: `{"errcode":40163,"errmsg":"code been used"}`}, "40163"},
		{"malformed json", &fakeWeChat{body: `{"openid":`}, "malformed"},
		{"html", &fakeWeChat{body: `<html>captive portal</html>`}, "malformed"},
		{"no openid", &fakeWeChat{body: `{"errcode":0}`}, "no openid"},
		{"http 400", &fakeWeChat{status: 400, body: `{}`}, "400"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newFake(t, tt.f, time.Second)
			_, err := c.Code2Session(context.Background(), "abc")
			if err == nil || !strings.Contains(err.Error(), tt.contain) {
				t.Fatalf("err = %v, want containing %q", err, tt.contain)
			}
			for _, s := range sentinels {
				if errors.Is(err, s) {
					t.Fatalf("err %v unexpectedly matches %v", err, s)
				}
			}
		})
	}
}

func TestCode2SessionUnavailable(t *testing.T) {
	t.Run("timeout", func(t *testing.T) {
		c := newFake(t, &fakeWeChat{body: `{"openid":"o"}`, delay: 5 * time.Second}, 50*time.Millisecond)
		start := time.Now()
		_, err := c.Code2Session(context.Background(), "abc")
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("err = %v, want ErrUnavailable", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("timeout not honoured: took %v", d)
		}
	})
	t.Run("connection refused", func(t *testing.T) {
		srv := httptest.NewServer(http.NotFoundHandler())
		base := srv.URL
		srv.Close()
		c, err := New(Config{APIBase: base, AppID: "a", Secret: "topsecret"})
		if err != nil {
			t.Fatal(err)
		}
		_, err = c.Code2Session(context.Background(), "abc")
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("err = %v, want ErrUnavailable", err)
		}
		if strings.Contains(err.Error(), "topsecret") {
			t.Fatalf("error leaks app secret: %v", err)
		}
	})
	t.Run("server error", func(t *testing.T) {
		c := newFake(t, &fakeWeChat{status: 502, body: `bad gateway`}, time.Second)
		_, err := c.Code2Session(context.Background(), "abc")
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("err = %v, want ErrUnavailable", err)
		}
	})
	t.Run("caller cancelled", func(t *testing.T) {
		c := newFake(t, &fakeWeChat{body: `{"openid":"o"}`, delay: 5 * time.Second}, time.Minute)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := c.Code2Session(ctx, "abc")
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("err = %v, want ErrUnavailable", err)
		}
	})
}

func TestNewValidates(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"defaults", Config{AppID: "a", Secret: "s"}, true},
		{"no appid", Config{Secret: "s"}, false},
		{"no secret", Config{AppID: "a"}, false},
		{"bad base", Config{AppID: "a", Secret: "s", APIBase: "ftp://x"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := New(tt.cfg)
			if (err == nil) != tt.ok {
				t.Fatalf("err = %v, want ok=%v", err, tt.ok)
			}
			if tt.ok && (c.base != DefaultAPIBase || c.timeout != DefaultTimeout) {
				t.Fatalf("defaults not applied: %+v", c)
			}
		})
	}
}

func TestEmptyCode(t *testing.T) {
	c := newFake(t, &fakeWeChat{body: `{"openid":"o"}`}, time.Second)
	if _, err := c.Code2Session(context.Background(), ""); !errors.Is(err, ErrInvalidCode) {
		t.Fatalf("err = %v", err)
	}
}
