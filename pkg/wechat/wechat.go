// Package wechat is a client for the WeChat mini-program API: the login
// API (code2session), which turns the one-time code a phone obtains from
// wx.login into the user's openid, and the server API's access token and
// subscribe messages (subscribe.go). The session key WeChat returns alongside is a
// secret shared with the phone and is kept out of every serialised form.
package wechat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// DefaultAPIBase is WeChat's public API endpoint.
const DefaultAPIBase = "https://api.weixin.qq.com"

// DefaultTimeout bounds one code2session round trip.
const DefaultTimeout = 5 * time.Second

// Errors callers branch on. Each maps to a distinct HTTP answer: a bad code is
// the client's fault (401), the rest are WeChat's state (429/403/503).
var (
	ErrInvalidCode = errors.New("wechat: invalid or expired login code")
	ErrRateLimited = errors.New("wechat: rate limited")
	ErrBlocked     = errors.New("wechat: user is blocked")
	ErrBusy        = errors.New("wechat: system busy")
	ErrUnavailable = errors.New("wechat: API unreachable")
)

// maxBody caps how much of a response is read; a real answer is ~200 bytes.
const maxBody = 64 << 10

// Config configures a Client. AppID and Secret are required.
type Config struct {
	APIBase    string        // default DefaultAPIBase
	AppID      string        // mini-program appid
	Secret     string        // mini-program app secret
	Timeout    time.Duration // per call; default DefaultTimeout
	HTTPClient *http.Client  // default: a fresh client (no shared global state)
}

// Client calls code2session and the server API. It is safe for concurrent
// use.
type Client struct {
	base    string
	appID   string
	secret  string
	timeout time.Duration
	hc      *http.Client

	tokMu      sync.Mutex // serialises fetching the access token
	token      string
	tokenUntil time.Time
}

// Session is the result of a successful code2session call.
type Session struct {
	OpenID  string `json:"openid"`
	UnionID string `json:"unionid,omitempty"`
	// SessionKey must never be sent to a client; json:"-" makes accidental
	// inclusion in an API response impossible.
	SessionKey string `json:"-"`
}

// String omits the session key so that logging a Session cannot leak it.
func (s Session) String() string {
	return fmt.Sprintf("wechat.Session{OpenID:%q UnionID:%q}", s.OpenID, s.UnionID)
}

// LogValue keeps the session key out of structured logs too.
func (s Session) LogValue() slog.Value {
	return slog.GroupValue(slog.String("openid", s.OpenID), slog.String("unionid", s.UnionID))
}

// New validates cfg and returns a Client.
func New(cfg Config) (*Client, error) {
	if cfg.AppID == "" || cfg.Secret == "" {
		return nil, errors.New("wechat: appid and secret are required")
	}
	base := cfg.APIBase
	if base == "" {
		base = DefaultAPIBase
	}
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("wechat: invalid API base %q", base)
	}
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	hc := cfg.HTTPClient
	if hc == nil {
		hc = &http.Client{}
	}
	return &Client{
		base:    strings.TrimRight(base, "/"),
		appID:   cfg.AppID,
		secret:  cfg.Secret,
		timeout: timeout,
		hc:      hc,
	}, nil
}

type code2SessionResponse struct {
	OpenID     string `json:"openid"`
	SessionKey string `json:"session_key"`
	UnionID    string `json:"unionid"`
	ErrCode    int    `json:"errcode"`
	ErrMsg     string `json:"errmsg"`
}

// Code2Session exchanges a wx.login code for the user's session.
func (c *Client) Code2Session(ctx context.Context, code string) (Session, error) {
	if code == "" {
		return Session{}, fmt.Errorf("code2session: empty code: %w", ErrInvalidCode)
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()

	q := url.Values{
		"appid":      {c.appID},
		"secret":     {c.secret},
		"js_code":    {code},
		"grant_type": {"authorization_code"},
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/sns/jscode2session?"+q.Encode(), nil)
	if err != nil {
		return Session{}, fmt.Errorf("code2session: build request: %w", err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		// The URL carries the secret; report only the cause, never the *url.Error text.
		return Session{}, fmt.Errorf("code2session: %w: %v", ErrUnavailable, unwrapURLError(err))
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return Session{}, fmt.Errorf("code2session: read response: %w: %v", ErrUnavailable, err)
	}
	if resp.StatusCode >= 500 {
		return Session{}, fmt.Errorf("code2session: HTTP %d: %w", resp.StatusCode, ErrUnavailable)
	}
	if resp.StatusCode != http.StatusOK {
		return Session{}, fmt.Errorf("code2session: unexpected HTTP status %d", resp.StatusCode)
	}
	var r code2SessionResponse
	if err := json.Unmarshal(body, &r); err != nil {
		return Session{}, fmt.Errorf("code2session: malformed response: %w", err)
	}
	switch r.ErrCode {
	case 0:
	case 40029:
		return Session{}, fmt.Errorf("code2session: errcode %d %q: %w", r.ErrCode, r.ErrMsg, ErrInvalidCode)
	case 45011:
		return Session{}, fmt.Errorf("code2session: errcode %d %q: %w", r.ErrCode, r.ErrMsg, ErrRateLimited)
	case 40226:
		return Session{}, fmt.Errorf("code2session: errcode %d %q: %w", r.ErrCode, r.ErrMsg, ErrBlocked)
	case -1:
		return Session{}, fmt.Errorf("code2session: errcode %d %q: %w", r.ErrCode, r.ErrMsg, ErrBusy)
	default:
		return Session{}, fmt.Errorf("code2session: errcode %d: %s", r.ErrCode, r.ErrMsg)
	}
	if r.OpenID == "" {
		return Session{}, errors.New("code2session: response has no openid")
	}
	return Session{OpenID: r.OpenID, UnionID: r.UnionID, SessionKey: r.SessionKey}, nil
}

func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
