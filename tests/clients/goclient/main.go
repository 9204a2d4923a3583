// goclient: a Go net/http client (crypto/tls) for the tests.
//
// usage: goclient URL METHOD PATH [METHOD PATH ...]
// Sends the requests on one keep-alive connection (a PUT carries
// "hello go"), prints "STATUS BODYBYTES" per request. With GOCLIENT_WAIT set
// it waits for a line on stdin first, so a tracer can start in between.
package main

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
)

func main() {
	if len(os.Args) < 4 || len(os.Args)%2 != 0 {
		os.Exit(2)
	}
	if os.Getenv("GOCLIENT_WAIT") != "" {
		bufio.NewReader(os.Stdin).ReadString('\n')
	}
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		ForceAttemptHTTP2: false,
		TLSNextProto:      map[string]func(string, *tls.Conn) http.RoundTripper{},
	}}
	base := os.Args[1]
	for i := 2; i+1 < len(os.Args); i += 2 {
		var body io.Reader
		if os.Args[i] == "PUT" {
			body = strings.NewReader("hello go")
		}
		req, err := http.NewRequest(os.Args[i], base+os.Args[i+1], body)
		if err != nil {
			os.Exit(3)
		}
		resp, err := client.Do(req)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(4)
		}
		n, _ := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		fmt.Printf("%d %d\n", resp.StatusCode, n)
	}
}
