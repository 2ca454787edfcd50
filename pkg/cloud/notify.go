package cloud

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/service"
	"github.com/outpost-edge/outpost/pkg/wechat"
)

// wechatNotifier sends alert notifications as WeChat subscribe messages
// with the configured template, whose fields must be: thing1 (the alert's
// message, or its rule), thing2 (the device), phrase3 (the severity) and
// time4 (when it started).
type wechatNotifier struct {
	c        *wechat.Client
	template string
}

func (w wechatNotifier) Notify(ctx context.Context, openid string, n fsm.Notification) error {
	a := n.Alert
	what := a.Message
	if what == "" {
		what = a.Rule
	}
	err := w.c.SendSubscribe(ctx, wechat.SubscribeMessage{ToUser: openid, TemplateID: w.template,
		Data: map[string]wechat.SubscribeValue{
			"thing1":  {Value: clip(what, 20)},
			"thing2":  {Value: clip(a.Device, 20)},
			"phrase3": {Value: clip(a.Severity, 5)},
			"time4":   {Value: time.UnixMilli(a.StartedAt).UTC().Format("2006-01-02 15:04:05")},
		}})
	if errors.Is(err, wechat.ErrRefused) {
		return fmt.Errorf("%w: %v", service.ErrNotifyRefused, err)
	}
	return err
}

// clip cuts s to at most n runes (WeChat's limits on template fields).
func clip(s string, n int) string {
	r := []rune(s)
	if len(r) > n {
		return string(r[:n])
	}
	return s
}
