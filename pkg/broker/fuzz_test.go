package broker

import (
	"context"
	"errors"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/outpost-edge/outpost/pkg/ingest"
)

// doneSubmitter stores nothing and reports every message durable at once.
type doneSubmitter struct{}

func (doneSubmitter) Submit(_ context.Context, m *ingest.Message) error {
	m.Done(nil)
	return nil
}

var fuzzBroker struct {
	once sync.Once
	b    *Broker
	err  error
}

// FuzzBrokerConnect feeds arbitrary bytes, as the first bytes of a
// connection, to a real embedded broker with credentials (the seeds start
// with valid CONNECTs, so the fuzzer reaches the publish path too): the
// broker must never panic, must close the connection, and must not allocate
// more for one connection than its packet caps allow (finding 5).
func FuzzBrokerConnect(f *testing.F) {
	f.Add([]byte{0x10, 0x0c, 0, 4, 'M', 'Q', 'T', 'T', 4, 2, 0, 30, 0, 0})
	f.Add(append(header(0x1, 0, 200<<20), 0, 4, 'M', 'Q', 'T', 'T'))
	f.Fuzz(func(t *testing.T, in []byte) {
		fuzzBroker.once.Do(func() {
			h, err := bcrypt.GenerateFromPassword([]byte("secret-a"), bcrypt.MinCost)
			if err != nil {
				fuzzBroker.err = err
				return
			}
			fuzzBroker.b, fuzzBroker.err = New(Config{
				Listen:         "127.0.0.1:0",
				Credentials:    map[string]string{"A": string(h)},
				ConnectTimeout: 2 * time.Second,
				// Throttling would soon refuse the seeds' valid logins and
				// keep the fuzzer out of the publish path.
				Login:  LoginLimits{PerAddr: 1e9, AddrBurst: 1 << 30, PerUser: 1e9, UserBurst: 1 << 30},
				Logger: discardLogger(),
			}, doneSubmitter{})
			if fuzzBroker.err == nil {
				fuzzBroker.err = fuzzBroker.b.Start()
			}
		})
		if fuzzBroker.err != nil {
			t.Fatal(fuzzBroker.err)
		}
		b := fuzzBroker.b
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		c, err := net.DialTimeout("tcp", b.Addr(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		_, _ = c.Write(in)
		// End of input: the broker finishes with what it got and closes.
		_ = c.(*net.TCPConn).CloseWrite()
		buf := make([]byte, 4096)
		for {
			if _, err := c.Read(buf); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatal("the broker did not close the connection after the input ended")
				}
				break
			}
		}
		runtime.ReadMemStats(&after)
		// What one connection may cost: the announced size of at most one
		// packet at a time, within the caps, plus the decoded copies of
		// what was actually sent, plus slack for the broker's bookkeeping.
		limit := uint64(2*b.cfg.MaxPacketBytes) + 64*uint64(len(in)) + 4<<20
		if grew := after.TotalAlloc - before.TotalAlloc; grew > limit {
			t.Fatalf("one connection of %d bytes allocated %d bytes (limit %d)", len(in), grew, limit)
		}
	})
}
