package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
	"strconv"
	"strings"

	"github.com/outpost-edge/outpost/internal/benchproc"
)

// The control pipe between the edge's process and the load's: the load
// writes one request per line on fd 3 and reads the reply ("ok", or
// "error: …") on fd 4. Requests: "gc" (collect garbage, so that the RSS
// read next is the edge's live memory), "prof FILE" and "unprof" (a CPU
// profile of the edge's process), "heap FILE" (its heap profile).

// runChild starts the load process with the edge's addresses, serves its
// requests and waits for it; its result line goes to stdout.
func runChild(o options, mqttAddr, httpAddr, token string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	reqR, reqW, err := os.Pipe()
	if err != nil {
		return err
	}
	repR, repW, err := os.Pipe()
	if err != nil {
		return err
	}
	args := append([]string{"-load", "-load-mqtt", mqttAddr, "-load-http", httpAddr, "-load-token", token,
		"-load-edge-pid", strconv.Itoa(os.Getpid()), "-live-interval", o.liveInterval.String()}, os.Args[1:]...)
	cmd := exec.Command(self, args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{reqW, repR} // fds 3 and 4
	if err := cmd.Start(); err != nil {
		return err
	}
	reqW.Close()
	repR.Close()
	served := make(chan error, 1)
	go func() { served <- serveControl(reqR, repW) }()
	err = cmd.Wait()
	// The load's exit closed its end of the requests: serveControl ends
	// at that EOF (closing reqR before then made its read fail).
	serr := <-served
	reqR.Close()
	repW.Close()
	if err != nil {
		return fmt.Errorf("load process: %w", err)
	}
	return serr
}

// serveControl answers the load's requests until it closes its end.
func serveControl(req *os.File, rep *os.File) error {
	var prof, tr recording
	defer prof.end()
	defer tr.end()
	sc := bufio.NewScanner(req)
	for sc.Scan() {
		verb, arg, _ := strings.Cut(sc.Text(), " ")
		var err error
		switch verb {
		case "gc":
			runtime.GC()
		case "prof":
			err = prof.begin(arg, pprof.StartCPUProfile, pprof.StopCPUProfile)
		case "unprof":
			err = prof.end()
		case "heap":
			err = writeHeap(arg)
		case "trace":
			err = tr.begin(arg, trace.Start, trace.Stop)
		case "untrace":
			err = tr.end()
		default:
			err = fmt.Errorf("unknown request %q", verb)
		}
		reply := "ok\n"
		if err != nil {
			reply = "error: " + err.Error() + "\n"
		}
		if _, err := rep.WriteString(reply); err != nil {
			return err
		}
	}
	return sc.Err()
}

// recording is a CPU profile or an execution trace being written to a
// file.
type recording struct {
	f    *os.File
	stop func()
}

func (r *recording) begin(path string, start func(io.Writer) error, stop func()) error {
	if r.f != nil {
		return fmt.Errorf("already writing %s", r.f.Name())
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := start(f); err != nil {
		f.Close()
		return err
	}
	r.f, r.stop = f, stop
	return nil
}

// end stops the recording, if one runs, and closes its file.
func (r *recording) end() error {
	if r.f == nil {
		return nil
	}
	r.stop()
	err := r.f.Close()
	r.f = nil
	return err
}

// control is the load's end of the pipe.
type control struct {
	w *os.File
	r *bufio.Reader
}

func dialControl() (*control, error) {
	w, r := os.NewFile(3, "control-requests"), os.NewFile(4, "control-replies")
	if w == nil || r == nil {
		return nil, errors.New("no control pipe: -load is started by livebench itself")
	}
	return &control{w: w, r: bufio.NewReader(r)}, nil
}

func (c *control) do(req string) error {
	if _, err := c.w.WriteString(req + "\n"); err != nil {
		return fmt.Errorf("control %q: %w", req, err)
	}
	line, err := c.r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("control %q: %w", req, err)
	}
	if line = strings.TrimSuffix(line, "\n"); line != "ok" {
		return fmt.Errorf("control %q: %s", req, line)
	}
	return nil
}

// rss is the edge's VmRSS (MB) after a collection.
func (c *control) rss(pid int) (float64, error) {
	if err := c.do("gc"); err != nil {
		return 0, err
	}
	return benchproc.StatusMB(pid)["VmRSS"], nil
}

// profile profiles (CPU) and traces the edge's process into
// profName+suffix and traceName+suffix, those set, if on holds, and
// returns what stops them.
func (c *control) profile(profName, traceName, suffix string, on bool) (func(), error) {
	var stops []string
	if on && profName != "" {
		if err := c.do("prof " + profName + suffix); err != nil {
			return nil, err
		}
		stops = append(stops, "unprof")
	}
	if on && traceName != "" {
		if err := c.do("trace " + traceName + suffix); err != nil {
			return nil, err
		}
		stops = append(stops, "untrace")
	}
	return func() {
		for _, s := range stops {
			_ = c.do(s)
		}
	}, nil
}
