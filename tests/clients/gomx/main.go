// gomx: the Go net/http client (crypto/tls) of tests/test_matrix.py.
//
// usage: gomx BASEURL PLANFILE [parallel]
// PLANFILE is JSON: a list of connections, each a list of requests
// {"case", "method", "target", "body": bytes, "te": "cl"|"ch"|"no",
// "expect": bool, "wmax": bytes per body Read}. The connections run one
// after the other, or with `parallel` at the same time (a goroutine each;
// results then say "concurrent": true), each on its own Transport (so one
// keep-alive connection each), its requests one after the other; the connection is made (TLS handshake
// done) before the first request. Prints one JSON list, per request:
// {"case", "status", "start", "first", "end", "resp_payload"} with
// CLOCK_MONOTONIC ns read at the TLS connection (net/http's goroutines and
// their hand-offs stay outside): start just before the request's first
// Write, end just after the Read that returned the response's last byte;
// first when client.Do returns; "preempted": a thread of the process was
// preempted (an involuntary context switch) during the first Write or the
// Read that set end: the interval may be stretched (the test runs its
// clients at real-time priority, where only the kernel's real-time
// throttling preempts them).
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

type step struct {
	Case   string `json:"case"`
	Method string `json:"method"`
	Target string `json:"target"`
	Body   int    `json:"body"`
	TE     string `json:"te"`
	Expect bool   `json:"expect"`
	WMax   int    `json:"wmax"`
}

type result struct {
	Case       string `json:"case"`
	Status     int    `json:"status"`
	Start      int64  `json:"start"`
	First      int64  `json:"first"`
	End        int64  `json:"end"`
	Payload    int64  `json:"resp_payload"`
	Preempted  bool   `json:"preempted"`
	Concurrent bool   `json:"concurrent,omitempty"`
	Error      string `json:"error,omitempty"`
}

// Request bodies: slices of one buffer (2 MiB + 1 at most).
var bodyData = bytes.Repeat([]byte{'g'}, 2*1024*1024+1)

// CLOCK_MONOTONIC, the clock of the server's log and the kernel's.
func mono() int64 {
	var ts syscall.Timespec
	syscall.Syscall(syscall.SYS_CLOCK_GETTIME, 1, uintptr(unsafe.Pointer(&ts)), 0)
	return ts.Nano()
}

// Involuntary context switches of the whole process (a goroutine may move
// between threads while it waits).
func nivcsw() int64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru.Nivcsw
}

// timedConn notes when the request's first Write starts and when a Read
// last returned data.
type timedConn struct {
	net.Conn
	mu                                sync.Mutex
	firstWrite, lastRead              int64
	writePreempted, lastReadPreempted bool
}

func (c *timedConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	first := c.firstWrite == 0
	before := nivcsw()
	if first {
		c.firstWrite = mono()
	}
	c.mu.Unlock()
	n, err := c.Conn.Write(b)
	if first {
		preempted := nivcsw() != before
		c.mu.Lock()
		c.writePreempted = preempted
		c.mu.Unlock()
	}
	return n, err
}

func (c *timedConn) Read(b []byte) (int, error) {
	before := nivcsw()
	n, err := c.Conn.Read(b)
	if n > 0 {
		t := mono()
		preempted := nivcsw() != before
		c.mu.Lock()
		c.lastRead, c.lastReadPreempted = t, preempted
		c.mu.Unlock()
	}
	return n, err
}

func (c *timedConn) times() (int64, int64, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.firstWrite, c.lastRead, c.writePreempted || c.lastReadPreempted
}

func (c *timedConn) reset() {
	c.mu.Lock()
	c.firstWrite = 0
	c.mu.Unlock()
}

// pieces hands out its body at most wmax bytes per Read: with an unknown
// length, each Read becomes one chunk on the wire.
type pieces struct {
	left, wmax int
}

func (p *pieces) Read(b []byte) (int, error) {
	if p.left == 0 {
		return 0, io.EOF
	}
	n := p.wmax
	if n > p.left {
		n = p.left
	}
	if n > len(b) {
		n = len(b)
	}
	for i := 0; i < n; i++ {
		b[i] = 'g'
	}
	p.left -= n
	return n, nil
}

func run(base string, steps []step) []result {
	u, err := url.Parse(base)
	if err != nil {
		panic(err)
	}
	config := &tls.Config{InsecureSkipVerify: true}
	tc, err := tls.Dial("tcp", u.Host, config)
	if err != nil {
		panic(err)
	}
	conn := &timedConn{Conn: tc}
	first := true
	client := &http.Client{Transport: &http.Transport{
		// The connection made above first, a new one only if it closed.
		DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if first {
				first = false
				return conn, nil
			}
			return tls.Dial(network, addr, config)
		},
		TLSClientConfig:       config,
		ForceAttemptHTTP2:     false,
		TLSNextProto:          map[string]func(string, *tls.Conn) http.RoundTripper{},
		DisableCompression:    true,
		MaxConnsPerHost:       1,
		MaxIdleConnsPerHost:   1,
		ExpectContinueTimeout: 30 * time.Second,
	}}
	var out []result
	for _, s := range steps {
		var body io.Reader
		if s.TE == "cl" {
			body = bytes.NewReader(bodyData[:s.Body])
		} else if s.TE == "ch" {
			wmax := s.WMax
			if wmax <= 0 {
				wmax = 16384
			}
			body = &pieces{left: s.Body, wmax: wmax}
		}
		req, err := http.NewRequest(s.Method, base+s.Target, body)
		if err != nil {
			panic(err)
		}
		if s.TE == "ch" {
			req.ContentLength = -1
		}
		if s.Expect {
			req.Header.Set("Expect", "100-continue")
		}
		conn.reset()
		r := result{Case: s.Case}
		resp, err := client.Do(req)
		if err != nil {
			r.Error = err.Error()
			out = append(out, r)
			return out
		}
		r.First = mono()
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		r.Start, r.End, r.Preempted = conn.times()
		r.Status, r.Payload = resp.StatusCode, n
		if err != nil {
			r.Error = err.Error()
		}
		out = append(out, r)
	}
	client.CloseIdleConnections()
	return out
}

func main() {
	if len(os.Args) < 3 || len(os.Args) > 4 {
		os.Exit(2)
	}
	data, err := os.ReadFile(os.Args[2])
	if err != nil {
		panic(err)
	}
	var plan [][]step
	if err := json.Unmarshal(data, &plan); err != nil {
		panic(err)
	}
	results := make([][]result, len(plan))
	if len(os.Args) == 4 && os.Args[3] == "parallel" {
		// The connections at the same time, one goroutine each. Then a
		// goroutine can wait for the Go scheduler between a Read and its
		// clock reading: "concurrent" says the times are upper bounds.
		var wg sync.WaitGroup
		for i, steps := range plan {
			wg.Add(1)
			go func(i int, steps []step) {
				defer wg.Done()
				results[i] = run(os.Args[1], steps)
				for j := range results[i] {
					results[i][j].Concurrent = true
				}
			}(i, steps)
		}
		wg.Wait()
	} else {
		for i, steps := range plan {
			results[i] = run(os.Args[1], steps)
		}
	}
	var all []result
	for _, r := range results {
		all = append(all, r...)
	}
	text, _ := json.Marshal(all)
	fmt.Println(string(text))
}
