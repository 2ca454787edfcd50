// Command demo runs a whole Outpost deployment on loopback: a 3-node
// cloud-sync cluster, two edges in different regions (east: Shanghai,
// west: Chengdu) joined to it, and a device simulator publishing to both.
// Every process runs the development configuration (configs/dev/, with its
// conveniences announced in its log); flags set the topology. The cluster
// runs with mutual TLS and serves https, and the edges reach it with
// -cloud-ca, from a development CA the demo makes in its directory
// (internal/devcerts, as `cloud-sync certs` does). It prints the URLs and
// curl commands to try, and on Ctrl-C stops everything in order
// (simulator, edges, cloud) with SIGTERM.
//
//	go run ./cmd/demo            (or: make demo)
//
// With -check it runs the printed commands itself once everything is up
// (login, nearest edge, latest reading, set desired, cloud export showing
// both edges), then stops and exits 0 or 1: the smoke test uses it.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/outpost-edge/outpost/internal/devcerts"
	"github.com/outpost-edge/outpost/pkg/certs"
)

const (
	apiToken = "demo-api-token"
	admin    = "admin"
)

type options struct {
	basePort int
	dir      string
	keep     bool
	check    bool
	interval time.Duration
}

func main() {
	var o options
	flag.IntVar(&o.basePort, "base-port", 17000, "first of the loopback ports to use (0: any free ports)")
	flag.StringVar(&o.dir, "dir", "", "directory for binaries, data and logs (default: a new temp dir, removed at exit)")
	flag.BoolVar(&o.keep, "keep", false, "keep -dir at exit")
	flag.BoolVar(&o.check, "check", false, "run the example requests once everything is up, then stop; exit 1 if one fails")
	flag.DurationVar(&o.interval, "interval", time.Second, "how often each simulated device publishes")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o, log); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

// proc is one child process of the demo.
type proc struct {
	name   string
	cmd    *exec.Cmd
	logf   string
	exited chan struct{}
}

type edge struct {
	id, region, location string
	http, mqtt           string
	devices              []string
}

func run(ctx context.Context, o options, log *slog.Logger) (err error) {
	root, err := repoRoot()
	if err != nil {
		return err
	}
	dir := o.dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "outpost-demo-"); err != nil {
			return err
		}
		if !o.keep {
			defer os.RemoveAll(dir)
		}
	}
	bin := filepath.Join(dir, "bin")
	for _, b := range []string{"edge", "cloud-sync"} {
		fmt.Printf("building %s ...\n", b)
		cmd := exec.CommandContext(ctx, "go", "build", "-o", filepath.Join(bin, b), "./cmd/"+b)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build ./cmd/%s: %w\n%s", b, err, out)
		}
	}

	ports, err := allocPorts(o.basePort)
	if err != nil {
		return err
	}
	pki, err := devcerts.Write(filepath.Join(dir, "certs"), devcerts.Options{Names: []string{"n1", "n2", "n3"}})
	if err != nil {
		return err
	}
	pool, err := certs.LoadPool(pki.CA)
	if err != nil {
		return err
	}
	hc.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}
	var procs []*proc
	// Stop in reverse start order: edges flush to a cloud that is still up.
	defer func() {
		for i := len(procs) - 1; i >= 0; i-- {
			if serr := procs[i].stop(15 * time.Second); serr != nil {
				err = errors.Join(err, serr)
			}
		}
		if err == nil {
			fmt.Println("demo stopped cleanly")
		}
	}()
	start := func(binary, name string, args ...string) (*proc, error) {
		p, err := startProc(dir, filepath.Join(bin, binary), name, args)
		if err != nil {
			return nil, err
		}
		procs = append(procs, p)
		return p, nil
	}

	// Cloud: n1 bootstraps, n2 and n3 join through it.
	var cloudURLs []string
	edges := []*edge{
		{id: "edge-east", region: "east", location: "31.2304,121.4737", http: ports("edge-east-http"), mqtt: ports("edge-east-mqtt"),
			devices: []string{"thermo-east-1", "thermo-east-2"}},
		{id: "edge-west", region: "west", location: "30.5728,104.0668", http: ports("edge-west-http"), mqtt: ports("edge-west-mqtt"),
			devices: []string{"thermo-west-1"}},
	}
	for i := 1; i <= 3; i++ {
		id := fmt.Sprintf("n%d", i)
		httpAddr := ports(id + "-http")
		args := []string{"-config", filepath.Join(root, "configs", "dev", "cloud-sync.yaml"), "-id", id, "-http", httpAddr, "-raft", ports(id + "-raft"), "-data", filepath.Join(dir, "cloud-"+id),
			"-api-token", apiToken, "-dev-login", "-admin", admin, "-log-level", "info"}
		args = append(args, pki.ClusterArgs(id)...)
		for _, e := range edges {
			args = append(args, "-edge-token", e.id+"="+edgeToken(e.id))
		}
		if i == 1 {
			args = append(args, "-bootstrap")
		} else {
			args = append(args, "-join", cloudURLs[0])
		}
		if _, err := start("cloud-sync", "cloud-sync-"+id, args...); err != nil {
			return err
		}
		cloudURLs = append(cloudURLs, "https://"+httpAddr)
		if err := waitOK(ctx, procs[len(procs)-1], cloudURLs[i-1]+"/readyz", 30*time.Second); err != nil {
			return err
		}
	}
	if err := waitMembers(ctx, cloudURLs[0], 3, 30*time.Second); err != nil {
		return err
	}

	for _, e := range edges {
		p, err := start("edge", e.id, "-config", filepath.Join(root, "configs", "dev", "edge.yaml"), "-id", e.id, "-region", e.region, "-location", e.location,
			"-http", e.http, "-mqtt-listen", e.mqtt, "-advertise", "http://"+e.http,
			"-data", filepath.Join(dir, e.id), "-policies", filepath.Join(root, "policies"),
			"-cloud", strings.Join(cloudURLs, ","), "-cloud-token", edgeToken(e.id), "-cloud-ca", pki.CA,
			"-dev-login", "-admin", admin, "-log-level", "info")
		if err != nil {
			return err
		}
		if err := waitOK(ctx, p, "http://"+e.http+"/readyz", 30*time.Second); err != nil {
			return err
		}
	}

	// The device simulator runs until the demo stops.
	simCtx, stopSim := context.WithCancel(ctx)
	var simWG sync.WaitGroup
	defer func() { stopSim(); simWG.Wait() }()
	for _, e := range edges {
		for _, d := range e.devices {
			simWG.Add(1)
			go func() {
				defer simWG.Done()
				if err := simulate(simCtx, e.mqtt, d, o.interval, o.check); err != nil && simCtx.Err() == nil {
					log.Error("device simulator", "device", d, "err", err)
				}
			}()
		}
	}

	printIntro(dir, pki.CA, cloudURLs, edges, procs, o.interval)
	if o.check {
		if err := check(ctx, cloudURLs, edges); err != nil {
			return fmt.Errorf("check: %w", err)
		}
		fmt.Println("check: every example request worked")
		return nil
	}
	fmt.Println("Press Ctrl-C to stop.")
	<-ctx.Done()
	fmt.Println("\nstopping: simulator, edges (they flush to the cloud), then cloud-sync ...")
	return nil
}

func edgeToken(id string) string { return "demo-" + id + "-token" }

// repoRoot finds the module root from the working directory.
func repoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && bytes.Contains(b, []byte("module github.com/outpost-edge/outpost\n")) {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", errors.New("run the demo inside the outpost repository (go run ./cmd/demo)")
		}
	}
}

// allocPorts hands out loopback addresses by name: base+offset, or free
// ports when base is 0.
func allocPorts(base int) (func(string) string, error) {
	offsets := map[string]int{
		"n1-http": 10, "n2-http": 11, "n3-http": 12, "n1-raft": 20, "n2-raft": 21, "n3-raft": 22,
		"edge-east-http": 30, "edge-east-mqtt": 31, "edge-west-http": 40, "edge-west-mqtt": 41,
	}
	addrs := map[string]string{}
	for name, off := range offsets {
		if base != 0 {
			addrs[name] = fmt.Sprintf("127.0.0.1:%d", base+off)
			continue
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("free port: %w", err)
		}
		addrs[name] = ln.Addr().String()
		ln.Close()
	}
	for name, a := range addrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			return nil, fmt.Errorf("port for %s (%s) is busy; pick other ports with -base-port N or -base-port 0: %w", name, a, err)
		}
		ln.Close()
	}
	return func(name string) string { return addrs[name] }, nil
}

func startProc(dir, bin, name string, args []string) (*proc, error) {
	logf := filepath.Join(dir, name+".log")
	f, err := os.Create(logf)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = f, f
	// Own process group: Ctrl-C reaches the demo only, which then stops the
	// children in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, logf: logf, exited: make(chan struct{})}
	go func() { _ = cmd.Wait(); f.Close(); close(p.exited) }()
	return p, nil
}

// stop sends SIGTERM and waits; past d it kills.
func (p *proc) stop(d time.Duration) error {
	select {
	case <-p.exited:
		return fmt.Errorf("%s had exited by itself (%v): see %s", p.name, p.cmd.ProcessState, p.logf)
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(d):
		_ = p.cmd.Process.Kill()
		<-p.exited
		return fmt.Errorf("%s did not stop within %s of SIGTERM; killed", p.name, d)
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		return fmt.Errorf("%s exited with %d: see %s", p.name, code, p.logf)
	}
	return nil
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

var hc = &http.Client{Timeout: 5 * time.Second}

// waitOK polls url until it answers 200, the process exits, or d passes.
func waitOK(ctx context.Context, p *proc, url string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		resp, err := hc.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.exited:
			return fmt.Errorf("%s exited during start-up:\n%s", p.name, tail(p.logf, 20))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready at %s after %s:\n%s", p.name, url, d, tail(p.logf, 20))
		}
	}
}

func waitMembers(ctx context.Context, url string, n int, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		var st struct {
			Nodes []json.RawMessage `json:"nodes"`
		}
		if err := getJSON(ctx, url+"/cluster/v1/status", apiToken, &st); err == nil && len(st.Nodes) >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cluster at %s has not got %d members after %s", url, n, d)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// simulate is one device: reported state once, then telemetry every
// interval; it prints desired state when the edge sends it.
func simulate(ctx context.Context, broker, device string, interval time.Duration, quiet bool) error {
	opts := paho.NewClientOptions().AddBroker("tcp://" + broker).SetClientID("sim-" + device).
		SetCleanSession(false).SetAutoReconnect(true).SetConnectRetry(true).SetConnectTimeout(5 * time.Second)
	c := paho.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return fmt.Errorf("connect to %s: %v", broker, tok.Error())
	}
	defer c.Disconnect(250)
	sub := c.Subscribe("devices/"+device+"/desired", 1, func(_ paho.Client, m paho.Message) {
		if !quiet {
			fmt.Printf("[device %s] desired state received: %s\n", device, m.Payload())
		}
	})
	if !sub.WaitTimeout(10*time.Second) || sub.Error() != nil {
		return fmt.Errorf("subscribe: %v", sub.Error())
	}
	pub := func(topic string, payload []byte) error {
		tok := c.Publish(topic, 1, false, payload)
		select {
		case <-tok.Done():
			return tok.Error()
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err := pub("sensors/"+device+"/state", []byte(`{"state":{"fw":"1.0.3","mode":"normal"}}`)); err != nil {
		return err
	}
	temp, hum := 18+rand.Float64()*8, 35+rand.Float64()*20
	t := time.NewTicker(interval)
	defer t.Stop()
	for seq := 0; ; seq++ {
		temp += rand.Float64() - 0.5
		hum += (rand.Float64() - 0.5) * 2
		b := fmt.Appendf(nil, `{"ts":%d,"id":"%s-%d","metrics":{"temp":%.2f,"hum":%.1f}}`, time.Now().UnixMilli(), device, seq, temp, hum)
		if err := pub("sensors/"+device+"/telemetry", b); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func printIntro(dir, ca string, cloud []string, edges []*edge, procs []*proc, interval time.Duration) {
	e, w := edges[0], edges[1]
	fmt.Printf(`
Outpost demo is running (data and logs in %s).

  cloud-sync   %s   (3-node raft, mutual TLS; consumer token: %s; CA %s)
  edge east    http://%s   mqtt://%s   Shanghai %s
  edge west    http://%s   mqtt://%s   Chengdu  %s
  devices      %s -> east, %s -> west, one reading each per %s
  logs         %s/*.log

Try these (paste into another terminal):

  # 1. Log in at the east edge (dev login; "admin" has the admin role) and keep the token
  TOKEN=$(curl -s -X POST http://%s/api/v1/auth/login -H 'Content-Type: application/json' \
      -d '{"code":"dev:admin"}' | sed -E 's/.*"access_token":"([^"]+)".*/\1/'); echo $TOKEN

  # 2. Which edges are nearest to a phone in Chengdu?
  curl -s -H "Authorization: Bearer $TOKEN" 'http://%s/api/v1/edges/nearest?lat=30.66&lng=104.06'

  # 3. The latest reading of a device
  curl -s -H "Authorization: Bearer $TOKEN" http://%s/api/v1/devices/%s/latest

  # 4. Set desired state (the simulated device prints it when it arrives)
  curl -s -X PUT -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
      -d '{"state":{"mode":"eco","setpoint":21.5}}' http://%s/api/v1/devices/%s/desired

  # 5. The cloud's merged changes from both edges (NDJSON; follow X-Outpost-Next-Cursor to resume)
  curl -s --cacert %s -H 'Authorization: Bearer %s' '%s/api/v1/export?limit=5'

`, dir, strings.Join(cloud, " "), apiToken, ca,
		e.http, e.mqtt, e.location, w.http, w.mqtt, w.location,
		strings.Join(e.devices, ", "), strings.Join(w.devices, ", "), interval, dir,
		e.http, e.http, e.http, e.devices[0], e.http, e.devices[0], ca, apiToken, cloud[0])
}

// check runs the printed requests and verifies what a newcomer should see.
func check(ctx context.Context, cloud []string, edges []*edge) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	e := edges[0]
	var login struct {
		AccessToken string `json:"access_token"`
	}
	if err := doJSON(ctx, http.MethodPost, "http://"+e.http+"/api/v1/auth/login", "", `{"code":"dev:admin"}`, &login); err != nil {
		return fmt.Errorf("login: %w", err)
	}
	tok := login.AccessToken
	if err := poll(ctx, "the latest reading", func() error {
		return getJSON(ctx, "http://"+e.http+"/api/v1/devices/"+e.devices[0]+"/latest", tok, nil)
	}); err != nil {
		return err
	}
	if err := poll(ctx, "both edges in the nearest-edge list", func() error {
		var near struct {
			Items []struct {
				ID string `json:"id"`
			} `json:"items"`
		}
		if err := getJSON(ctx, "http://"+e.http+"/api/v1/edges/nearest?lat=30.66&lng=104.06", tok, &near); err != nil {
			return err
		}
		if len(near.Items) < 2 || near.Items[0].ID != "edge-west" {
			return fmt.Errorf("nearest to Chengdu: %+v, want edge-west first, then edge-east", near.Items)
		}
		return nil
	}); err != nil {
		return err
	}
	if err := doJSON(ctx, http.MethodPut, "http://"+e.http+"/api/v1/devices/"+e.devices[0]+"/desired", tok,
		`{"state":{"mode":"eco","setpoint":21.5}}`, nil); err != nil {
		return fmt.Errorf("set desired: %w", err)
	}
	return poll(ctx, "the cloud export to hold both edges' data and the desired write", func() error {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, cloud[0]+"/api/v1/export?limit=10000", nil)
		req.Header.Set("Authorization", "Bearer "+apiToken)
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		seen := map[string]bool{}
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 16<<20)
		for sc.Scan() {
			var r struct {
				Edge, Kind, Device string
			}
			if json.Unmarshal(sc.Bytes(), &r) == nil {
				seen[r.Edge] = true
				seen[r.Kind+"/"+r.Device] = true
			}
		}
		for _, want := range []string{"edge-east", "edge-west", "desired/" + e.devices[0]} {
			if !seen[want] {
				return fmt.Errorf("export has no %s yet", want)
			}
		}
		return nil
	})
}

func poll(ctx context.Context, what string, f func() error) error {
	var err error
	for {
		if err = f(); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func getJSON(ctx context.Context, url, token string, out any) error {
	return doJSON(ctx, http.MethodGet, url, token, "", out)
}

// doJSON calls an Outpost API and unwraps the {code, message, data} envelope.
func doJSON(ctx context.Context, method, url, token, body string, out any) error {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		return err
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var env struct {
		Code    int             `json:"code"`
		Message string          `json:"message"`
		Data    json.RawMessage `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&env); err != nil {
		return fmt.Errorf("%s %s: %d, not an envelope: %w", method, url, resp.StatusCode, err)
	}
	if resp.StatusCode != http.StatusOK || env.Code != 0 {
		return fmt.Errorf("%s %s: %d %s", method, url, resp.StatusCode, env.Message)
	}
	if out != nil {
		return json.Unmarshal(env.Data, out)
	}
	return nil
}
