package wechat

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"
)

// The server side of the API: the access token (client credentials) and
// subscribe messages, which the cloud sends to a device's owners when a
// rule with a notify action fires.

// Errors of SendSubscribe callers branch on: ErrRefused is final (the user
// has not accepted the template, or the openid is unknown: retrying cannot
// help); everything else is worth a retry.
var ErrRefused = errors.New("wechat: subscribe message refused")

// tokenMargin renews the access token this long before WeChat says it
// expires, so a token is never used in its last moments.
const tokenMargin = 5 * time.Minute

// SubscribeMessage is the body of subscribe/send: a template message to
// one user.
type SubscribeMessage struct {
	ToUser     string                    `json:"touser"`
	TemplateID string                    `json:"template_id"`
	Page       string                    `json:"page,omitempty"`
	Data       map[string]SubscribeValue `json:"data"`
}

// SubscribeValue is one field of a subscribe message's template.
type SubscribeValue struct {
	Value string `json:"value"`
}

type tokenResponse struct {
	AccessToken string `json:"access_token"`
	ExpiresIn   int64  `json:"expires_in"`
	ErrCode     int    `json:"errcode"`
	ErrMsg      string `json:"errmsg"`
}

// AccessToken returns the server access token, fetched with the app's
// credentials (GET /cgi-bin/token?grant_type=client_credential) and cached
// until shortly before it expires.
func (c *Client) AccessToken(ctx context.Context) (string, error) {
	c.tokMu.Lock()
	defer c.tokMu.Unlock()
	if c.token != "" && time.Now().Before(c.tokenUntil) {
		return c.token, nil
	}
	q := url.Values{"grant_type": {"client_credential"}, "appid": {c.appID}, "secret": {c.secret}}
	var r tokenResponse
	if err := c.call(ctx, http.MethodGet, "/cgi-bin/token?"+q.Encode(), nil, &r); err != nil {
		return "", fmt.Errorf("access token: %w", err)
	}
	switch {
	case r.ErrCode == -1:
		return "", fmt.Errorf("access token: errcode %d %q: %w", r.ErrCode, r.ErrMsg, ErrBusy)
	case r.ErrCode != 0:
		return "", fmt.Errorf("access token: errcode %d: %s", r.ErrCode, r.ErrMsg)
	case r.AccessToken == "":
		return "", errors.New("access token: response has no access_token")
	}
	life := time.Duration(r.ExpiresIn) * time.Second
	c.token, c.tokenUntil = r.AccessToken, time.Now().Add(max(life-tokenMargin, life/2))
	return c.token, nil
}

// dropToken forgets a token WeChat said is invalid or expired.
func (c *Client) dropToken(tok string) {
	c.tokMu.Lock()
	defer c.tokMu.Unlock()
	if c.token == tok {
		c.token = ""
	}
}

// SendSubscribe sends m (POST /cgi-bin/message/subscribe/send). A token
// WeChat calls invalid or expired is dropped, so the retry fetches a new
// one; ErrRefused means retrying cannot help.
func (c *Client) SendSubscribe(ctx context.Context, m SubscribeMessage) error {
	tok, err := c.AccessToken(ctx)
	if err != nil {
		return err
	}
	body, err := json.Marshal(m)
	if err != nil {
		return err
	}
	var r struct {
		ErrCode int    `json:"errcode"`
		ErrMsg  string `json:"errmsg"`
	}
	if err := c.call(ctx, http.MethodPost, "/cgi-bin/message/subscribe/send?access_token="+url.QueryEscape(tok), body, &r); err != nil {
		return fmt.Errorf("subscribe send: %w", err)
	}
	switch r.ErrCode {
	case 0:
		return nil
	case 40001, 42001, 40014: // invalid, expired or malformed access token
		c.dropToken(tok)
		return fmt.Errorf("subscribe send: errcode %d %q: token renewed, retry", r.ErrCode, r.ErrMsg)
	case 43101, 40003, 40037: // the user did not subscribe, unknown openid, unknown template
		return fmt.Errorf("subscribe send: errcode %d %q: %w", r.ErrCode, r.ErrMsg, ErrRefused)
	case -1:
		return fmt.Errorf("subscribe send: errcode %d %q: %w", r.ErrCode, r.ErrMsg, ErrBusy)
	case 45009, 45011:
		return fmt.Errorf("subscribe send: errcode %d %q: %w", r.ErrCode, r.ErrMsg, ErrRateLimited)
	}
	return fmt.Errorf("subscribe send: errcode %d: %s", r.ErrCode, r.ErrMsg)
}

// call does one round trip and decodes the JSON answer into out. The URL
// may carry the secret or the token: errors never include it.
func (c *Client) call(ctx context.Context, method, path string, body []byte, out any) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return fmt.Errorf("build request: %w", err)
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, unwrapURLError(err))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return fmt.Errorf("read response: %w: %v", ErrUnavailable, err)
	}
	if resp.StatusCode >= 500 {
		return fmt.Errorf("HTTP %d: %w", resp.StatusCode, ErrUnavailable)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("unexpected HTTP status %d", resp.StatusCode)
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("malformed response: %w", err)
	}
	return nil
}
