package wechat

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
)

// fakeServer is WeChat's server API: it issues tokens (counting fetches),
// answers each send with the next scripted errcode (0 when the script is
// done) and records what was sent.
type fakeServer struct {
	mu      sync.Mutex
	tokens  int
	expires int64
	script  []int
	sent    []SubscribeMessage
	withTok []string
}

func (f *fakeServer) start(t *testing.T) *Client {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		switch r.URL.Path {
		case "/cgi-bin/token":
			q := r.URL.Query()
			if q.Get("grant_type") != "client_credential" || q.Get("appid") != "wxapp" || q.Get("secret") != "s3cret" {
				_ = json.NewEncoder(w).Encode(map[string]any{"errcode": 40013, "errmsg": "invalid appid"})
				return
			}
			f.tokens++
			_ = json.NewEncoder(w).Encode(map[string]any{"access_token": "tok" + string(rune('0'+f.tokens)), "expires_in": f.expires})
		case "/cgi-bin/message/subscribe/send":
			var m SubscribeMessage
			_ = json.NewDecoder(r.Body).Decode(&m)
			code := 0
			if len(f.script) > 0 {
				code, f.script = f.script[0], f.script[1:]
			}
			if code == 0 {
				f.sent = append(f.sent, m)
				f.withTok = append(f.withTok, r.URL.Query().Get("access_token"))
			}
			_ = json.NewEncoder(w).Encode(map[string]any{"errcode": code, "errmsg": "scripted"})
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	c, err := New(Config{AppID: "wxapp", Secret: "s3cret", APIBase: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestSubscribeSend: the access token is fetched with the client
// credentials once and cached; a token WeChat calls expired is dropped and
// the next send fetches a new one; a busy answer is retryable, a refusal
// (the user did not subscribe) is ErrRefused.
func TestSubscribeSend(t *testing.T) {
	f := &fakeServer{expires: 7200, script: []int{0, 0, 42001, 0, -1, 43101}}
	c := f.start(t)
	ctx := context.Background()
	m := SubscribeMessage{ToUser: "o-1", TemplateID: "tpl", Data: map[string]SubscribeValue{"thing1": {Value: "hot"}}}
	for i := range 2 {
		if err := c.SendSubscribe(ctx, m); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	if f.tokens != 1 {
		t.Fatalf("%d token fetches for two sends, want 1 (cached)", f.tokens)
	}
	if err := c.SendSubscribe(ctx, m); err == nil || errors.Is(err, ErrRefused) {
		t.Fatalf("send with an expired token: %v", err)
	}
	if err := c.SendSubscribe(ctx, m); err != nil {
		t.Fatalf("send after the token was renewed: %v", err)
	}
	if f.tokens != 2 || f.withTok[2] != "tok2" {
		t.Fatalf("token fetches %d, last sent with %q: want a new token after expiry", f.tokens, f.withTok[2])
	}
	if err := c.SendSubscribe(ctx, m); !errors.Is(err, ErrBusy) {
		t.Fatalf("busy: %v", err)
	}
	if err := c.SendSubscribe(ctx, m); !errors.Is(err, ErrRefused) {
		t.Fatalf("not subscribed: %v", err)
	}
	if len(f.sent) != 3 || f.sent[0].ToUser != "o-1" || f.sent[0].TemplateID != "tpl" || f.sent[0].Data["thing1"].Value != "hot" {
		t.Fatalf("sent %+v", f.sent)
	}
}
