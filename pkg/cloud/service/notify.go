package service

import (
	"context"
	"errors"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
)

// Notifier sends one owner a queued alert notification (a WeChat subscribe
// message). An error matching ErrNotifyRefused is final: the owner is
// marked done without a message; any other is retried with backoff.
type Notifier interface {
	Notify(ctx context.Context, openid string, n fsm.Notification) error
}

// ErrNotifyRefused marks a notification the messaging service refused for
// good (the user did not subscribe to the template).
var ErrNotifyRefused = errors.New("notification refused")

// Backoff of a failing notification, per owner.
const (
	notifyBackoffBase = 500 * time.Millisecond
	notifyBackoffMax  = time.Minute
	notifyBatch       = 100
)

// RunNotify works the replicated notification queue on the leader until
// ctx ends: each owner of each queued alert is sent its message once, and
// the send recorded (fsm.CmdNotifyDone) before the next look. Followers only
// wait; a new leader resumes from the queue. Without a Notifier it returns
// at once (the queue stays, for a node configured with one).
func (s *Service) RunNotify(ctx context.Context, every time.Duration) {
	if s.cfg.Notifier == nil {
		return
	}
	if every <= 0 {
		every = notifyBackoffBase
	}
	type retry struct {
		next time.Time
		wait time.Duration
	}
	retries := map[string]*retry{} // alert id 0 owner
	s.everyWhileLeader(ctx, every, func(leading bool) {
		if !leading {
			clear(retries)
			return
		}
		queued, err := s.state.Notifications(notifyBatch)
		if err != nil {
			s.log.Error("read the notification queue", "err", err)
			return
		}
		for _, n := range queued {
			for _, owner := range n.Pending() {
				key := n.Alert.ID + "\x00" + owner
				r := retries[key]
				if r != nil && time.Now().Before(r.next) {
					continue
				}
				err := s.cfg.Notifier.Notify(ctx, owner, n)
				switch {
				case err == nil:
					s.m.notifications.WithLabelValues("sent").Inc()
				case errors.Is(err, ErrNotifyRefused):
					s.m.notifications.WithLabelValues("refused").Inc()
					s.log.Warn("notification refused for good; not retried", "alert", n.Alert.ID, "owner", owner, "err", err)
				default:
					if ctx.Err() != nil {
						return
					}
					if r == nil {
						r = &retry{wait: notifyBackoffBase}
						retries[key] = r
					} else {
						r.wait = min(2*r.wait, notifyBackoffMax)
					}
					r.next = time.Now().Add(r.wait)
					s.m.notifications.WithLabelValues("failed").Inc()
					s.log.Warn("notification failed; retrying", "alert", n.Alert.ID, "owner", owner, "wait", r.wait, "err", err)
					continue
				}
				delete(retries, key)
				if _, err := s.propose(ctx, &fsm.Command{Type: fsm.CmdNotifyDone, Notify: &fsm.NotifyDoneCmd{ID: n.Alert.ID, Owner: owner}}); err != nil {
					// Sent but not recorded: the next leader (or this one,
					// once the proposal succeeds) would send it again.
					s.log.Error("record a sent notification", "alert", n.Alert.ID, "owner", owner, "err", err)
				}
			}
		}
	})
}
