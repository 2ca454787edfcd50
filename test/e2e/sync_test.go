package e2e

import (
	"testing"
	"time"
)

// (a) The link between edge and cloud is cut while devices keep publishing.
// The edge keeps ingesting offline; after the link heals every acknowledged
// reading is on every cloud node exactly once.
func TestSyncLinkCutDuringIngest(t *testing.T) {
	c := startCloudCluster(t, 3)
	link := newSyncLink(t, c)
	e := startSyncEdge(t, "e0", link)
	devs := newEdgeDevices(4, 2500)
	load := startSyncLoad(t, e, devs, 50)

	load.waitAcks(t, 2000, 60*time.Second)
	link.cut(true)
	load.waitAcks(t, 6000, 60*time.Second)
	tok := e.login()
	st, err := e.syncStatus(tok)
	if err != nil {
		t.Fatal(err)
	}
	if st.Cloud.Backlog == 0 {
		t.Errorf("backlog 0 while the link is cut: %+v", st.Cloud)
	}
	link.cut(false)
	load.wait(t)
	waitCloudExactlyOnce(t, c, "e0", ackedIDs(devs), sentIDs(devs), 60*time.Second)
	cloudWaitFor(t, 20*time.Second, "edge reports connected with an empty backlog", func() bool {
		st, err := e.syncStatus(tok)
		return err == nil && st.Cloud.Connected && st.Cloud.Backlog == 0 && st.Cloud.LastSync != nil
	})
}
