// Command goproxy is the benchmark's Go side (standard library only, built offline by bench/compare.py):
//
//	goproxy proxy  -listen A -cert F -key F -upstream URL -upstream-ca F -upstream-token-file F
//	               [-jwt-key PEM -audience UUID -subject UUID]
//	    net/http/httputil.ReverseProxy over TLS, the upstream token swapped in for the peer's.
//	    With -jwt-key, every request's EdDSA JWT is verified first (signature, iss, sub, aud,
//	    scope, exp, nbf), as Deckhouse's Go proxy does: no cache, one check per request.
//	goproxy events -listen A -cert F -key F -token-file F -template F
//	    a watch event source with the URL layout of kube-apiserver for pods in a namespace
//	    (LIST ?limit=1 for the resourceVersion, then ?watch=1). Commands on stdin, one JSON line
//	    answered per command, as bench/upstream.py does:
//	      churn RATE SECONDS  RATE updates/s, each sent to every open watch on namespace churn,
//	                          stamped at generation; RATE 0: every watch writes as fast as it can,
//	                          each event stamped when written
//	      watchers            open watches
//	      quit
//	goproxy watch -url URL -token-file F -ca F -watchers N
//	    the watch load: N watches on pods of namespace churn (after a LIST for the
//	    resourceVersion), prints {"ready": N}, counts events and their latency (receipt time
//	    minus the bench.apiproxy.io/sent-ns stamp) until `stop` on stdin, prints the result as
//	    bench/client.py does. Go, so that the client is not what limits the direct figure.
package main

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sort"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		log.Fatal("usage: goproxy proxy|events ...")
	}
	switch os.Args[1] {
	case "proxy":
		proxy(os.Args[2:])
	case "events":
		events(os.Args[2:])
	case "watch":
		watch(os.Args[2:])
	default:
		log.Fatalf("unknown mode %q", os.Args[1])
	}
}

func readTrim(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		log.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// listen binds, then prints {"url": ...} on stdout so the harness reads the port back.
func listen(addr string) net.Listener {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("{\"url\": \"https://%s\", \"pid\": %d}\n", ln.Addr().String(), os.Getpid())
	return ln
}

// ------------------------------------------------------------------------------------ the proxy

type verifier struct {
	key      ed25519.PublicKey
	audience string
	subject  string
}

type claims struct {
	Iss   string `json:"iss"`
	Sub   string `json:"sub"`
	Aud   string `json:"aud"`
	Scope string `json:"scope"`
	Exp   int64  `json:"exp"`
	Nbf   int64  `json:"nbf"`
}

func (v *verifier) check(auth string) bool {
	tok, ok := strings.CutPrefix(auth, "Bearer ")
	if !ok {
		return false
	}
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return false
	}
	hdr, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil {
		return false
	}
	var h struct {
		Alg string `json:"alg"`
	}
	if json.Unmarshal(hdr, &h) != nil || h.Alg != "EdDSA" {
		return false
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil || !ed25519.Verify(v.key, []byte(tok[:len(parts[0])+1+len(parts[1])]), sig) {
		return false
	}
	body, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return false
	}
	var c claims
	if json.Unmarshal(body, &c) != nil {
		return false
	}
	now := time.Now().Unix()
	return c.Iss == "apiproxy" && c.Sub == v.subject && c.Aud == v.audience && c.Scope == "api" &&
		now < c.Exp && now >= c.Nbf-5
}

func proxy(args []string) {
	fs := flag.NewFlagSet("proxy", flag.ExitOnError)
	addr := fs.String("listen", "127.0.0.1:0", "")
	cert := fs.String("cert", "", "")
	key := fs.String("key", "", "")
	upstream := fs.String("upstream", "", "")
	upstreamCA := fs.String("upstream-ca", "", "")
	tokenFile := fs.String("upstream-token-file", "", "")
	jwtKey := fs.String("jwt-key", "", "PEM Ed25519 public key: check every request's JWT")
	audience := fs.String("audience", "", "")
	subject := fs.String("subject", "", "")
	_ = fs.Parse(args)

	target, err := url.Parse(*upstream)
	if err != nil {
		log.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(readTrim(*upstreamCA))) {
		log.Fatal("no CA in -upstream-ca")
	}
	bearer := "Bearer " + readTrim(*tokenFile)
	var v *verifier
	if *jwtKey != "" {
		block, _ := pem.Decode([]byte(readTrim(*jwtKey)))
		if block == nil {
			log.Fatal("no PEM in -jwt-key")
		}
		pub, err := x509.ParsePKIXPublicKey(block.Bytes)
		if err != nil {
			log.Fatal(err)
		}
		edKey, ok := pub.(ed25519.PublicKey)
		if !ok {
			log.Fatal("-jwt-key is not Ed25519")
		}
		v = &verifier{key: edKey, audience: *audience, subject: *subject}
	}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.FlushInterval = -1 // watches: every write reaches the client at once
	rp.Transport = &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool},
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 1024,
		IdleConnTimeout:     10 * time.Minute,
		ForceAttemptHTTP2:   false,
	}
	rp.ErrorLog = log.New(os.Stderr, "", 0)
	director := rp.Director
	rp.Director = func(r *http.Request) {
		director(r)
		r.Header.Set("Authorization", bearer)
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if v != nil && !v.check(r.Header.Get("Authorization")) {
			http.Error(w, `{"kind":"Status","status":"Failure","code":401}`, http.StatusUnauthorized)
			return
		}
		rp.ServeHTTP(w, r)
	})
	srv := &http.Server{Handler: handler, TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){}}
	log.Fatal(srv.ServeTLS(listen(*addr), *cert, *key))
}

// ------------------------------------------------------------------------------ the event source

type watcher struct {
	ch chan int64 // stamps (unix ns) of paced updates
}

type source struct {
	mu       sync.Mutex
	watchers map[*watcher]struct{}
	head     []byte // event JSON up to the stamp
	mid      []byte // between the stamp and the resourceVersion
	tail     []byte // after the resourceVersion
	rv       atomic.Int64
	maxUntil atomic.Int64 // unix ns: while now < maxUntil, watches write as fast as they can
	maxWake  atomic.Pointer[chan struct{}] // closed when a max-rate run starts
	sent     atomic.Int64
}

func (s *source) event(buf []byte, stamp int64) []byte {
	buf = append(buf[:0], s.head...)
	buf = strconv.AppendInt(buf, stamp, 10)
	buf = append(buf, s.mid...)
	buf = strconv.AppendInt(buf, s.rv.Add(1), 10)
	return append(buf, s.tail...)
}

func (s *source) serveHTTP(w http.ResponseWriter, r *http.Request, token string) {
	if r.Header.Get("Authorization") != token {
		http.Error(w, `{"kind":"Status","status":"Failure","code":401}`, http.StatusUnauthorized)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	q := r.URL.Query()
	if q.Get("watch") != "1" && q.Get("watch") != "true" {
		fmt.Fprintf(w, `{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"%d"},"items":[]}`, s.rv.Load())
		return
	}
	flusher := w.(http.Flusher)
	w.WriteHeader(http.StatusOK)
	flusher.Flush()
	me := &watcher{ch: make(chan int64, 1<<16)}
	s.mu.Lock()
	s.watchers[me] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.watchers, me)
		s.mu.Unlock()
	}()
	churn := strings.Contains(r.URL.Path, "/namespaces/churn/")
	var buf []byte
	ctx := r.Context()
	for {
		if churn && time.Now().UnixNano() < s.maxUntil.Load() {
			buf = s.event(buf, time.Now().UnixNano())
			if _, err := w.Write(buf); err != nil {
				return
			}
			flusher.Flush()
			s.sent.Add(1)
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-*s.maxWake.Load():
		case stamp := <-me.ch:
			if !churn {
				continue
			}
			buf = s.event(buf, stamp)
			if _, err := w.Write(buf); err != nil {
				return
			}
			flusher.Flush()
			s.sent.Add(1)
		}
	}
}

func (s *source) churn(rate float64, seconds float64) map[string]any {
	start := time.Now()
	end := start.Add(time.Duration(seconds * float64(time.Second)))
	s.sent.Store(0)
	updates := int64(0)
	if rate <= 0 {
		s.maxUntil.Store(end.UnixNano())
		close(*s.maxWake.Load()) // wake every watch; a fresh channel for the next run
		time.Sleep(time.Until(end))
		fresh := make(chan struct{})
		s.maxWake.Store(&fresh)
		s.mu.Lock()
		n := int64(len(s.watchers))
		s.mu.Unlock()
		if n > 0 {
			updates = s.sent.Load() / n
		}
	} else {
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for now := range tick.C {
			if now.After(end) {
				break
			}
			due := int64(now.Sub(start).Seconds() * rate)
			for ; updates < due; updates++ {
				stamp := time.Now().UnixNano()
				s.mu.Lock()
				for w := range s.watchers {
					select {
					case w.ch <- stamp:
					default: // a watch 65k events behind: dropped, shows as undelivered
					}
				}
				s.mu.Unlock()
			}
		}
	}
	return map[string]any{"updates": updates, "sent": s.sent.Load(), "seconds": time.Since(start).Seconds()}
}

func events(args []string) {
	fs := flag.NewFlagSet("events", flag.ExitOnError)
	addr := fs.String("listen", "127.0.0.1:0", "")
	cert := fs.String("cert", "", "")
	key := fs.String("key", "", "")
	tokenFile := fs.String("token-file", "", "")
	template := fs.String("template", "", "one watch event; @@STAMP@@ and @@RV@@ are filled in")
	_ = fs.Parse(args)
	tpl, err := os.ReadFile(*template)
	if err != nil {
		log.Fatal(err)
	}
	tpl = append(bytes.TrimSpace(tpl), '\n')
	i := bytes.Index(tpl, []byte("@@STAMP@@"))
	j := bytes.Index(tpl, []byte("@@RV@@"))
	if i < 0 || j < i {
		log.Fatal("template needs @@STAMP@@ before @@RV@@")
	}
	s := &source{
		watchers: map[*watcher]struct{}{},
		head:     tpl[:i],
		mid:      tpl[i+len("@@STAMP@@") : j],
		tail:     tpl[j+len("@@RV@@"):],
	}
	wake := make(chan struct{})
	s.maxWake.Store(&wake)
	s.rv.Store(1000)
	token := "Bearer " + readTrim(*tokenFile)
	srv := &http.Server{
		Handler:      http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { s.serveHTTP(w, r, token) }),
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	go func() { log.Fatal(srv.ServeTLS(listen(*addr), *cert, *key)) }()
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		var out any
		switch f[0] {
		case "churn":
			rate, _ := strconv.ParseFloat(f[1], 64)
			secs, _ := strconv.ParseFloat(f[2], 64)
			out = s.churn(rate, secs)
		case "watchers":
			s.mu.Lock()
			out = map[string]any{"watchers": len(s.watchers)}
			s.mu.Unlock()
		case "quit":
			os.Exit(0)
		default:
			out = map[string]any{"error": "unknown command " + f[0]}
		}
		b, _ := json.Marshal(out)
		fmt.Println(string(b))
	}
}

// ---------------------------------------------------------------------------------- watch client

type tally struct {
	mu        sync.Mutex
	latencies []int64
	events    int64
	bytes     int64
	firstSent int64
	lastRecv  int64
}

var stampKey = []byte(`"bench.apiproxy.io/sent-ns":"`)

func (t *tally) consume(body *bufio.Reader) {
	for {
		line, err := body.ReadSlice('\n')
		now := time.Now().UnixNano()
		if err == bufio.ErrBufferFull {
			log.Fatal("watch event longer than the read buffer")
		}
		if err != nil {
			return
		}
		i := bytes.Index(line, stampKey)
		if i < 0 {
			continue
		}
		rest := line[i+len(stampKey):]
		sent, perr := strconv.ParseInt(string(rest[:bytes.IndexByte(rest, '"')]), 10, 64)
		if perr != nil {
			log.Fatal(perr)
		}
		t.mu.Lock()
		t.latencies = append(t.latencies, now-sent)
		t.events++
		t.bytes += int64(len(line))
		if t.firstSent == 0 || sent < t.firstSent {
			t.firstSent = sent
		}
		t.lastRecv = now
		t.mu.Unlock()
	}
}

func pct(s []int64, q float64) float64 {
	if len(s) == 0 {
		return 0
	}
	i := int(q * float64(len(s)))
	if i >= len(s) {
		i = len(s) - 1
	}
	return float64(s[i])
}

func watch(args []string) {
	fs := flag.NewFlagSet("watch", flag.ExitOnError)
	base := fs.String("url", "", "")
	tokenFile := fs.String("token-file", "", "")
	caFile := fs.String("ca", "", "")
	n := fs.Int("watchers", 1, "")
	_ = fs.Parse(args)
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(readTrim(*caFile))) {
		log.Fatal("no CA in -ca")
	}
	bearer := "Bearer " + readTrim(*tokenFile)
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool},
		MaxIdleConnsPerHost: 64,
		DisableCompression:  true,
	}}
	get := func(u string) *http.Response {
		req, _ := http.NewRequest("GET", u, nil)
		req.Header.Set("Authorization", bearer)
		req.Header.Set("Accept", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			log.Fatal(err)
		}
		if resp.StatusCode != 200 {
			b, _ := io.ReadAll(resp.Body)
			log.Fatalf("GET %s: %d %s", u, resp.StatusCode, b)
		}
		return resp
	}
	resp := get(*base + "/api/v1/namespaces/churn/pods?limit=1")
	var list struct {
		Metadata struct {
			ResourceVersion string `json:"resourceVersion"`
		} `json:"metadata"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		log.Fatal(err)
	}
	resp.Body.Close()
	path := *base + "/api/v1/namespaces/churn/pods?watch=1&timeoutSeconds=3000&resourceVersion=" +
		list.Metadata.ResourceVersion
	t := &tally{}
	var wg sync.WaitGroup
	for i := 0; i < *n; i++ {
		wg.Add(1)
		go func() {
			r := get(path)
			wg.Done()
			t.consume(bufio.NewReaderSize(r.Body, 1<<20))
		}()
	}
	wg.Wait()
	fmt.Printf("{\"ready\": %d}\n", *n)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() && strings.TrimSpace(in.Text()) != "stop" {
	}
	t.mu.Lock()
	lat := append([]int64(nil), t.latencies...)
	out := map[string]any{
		"watchers": *n, "events": t.events, "bytes": t.bytes, "retries": map[string]int{},
	}
	span := float64(t.lastRecv-t.firstSent) / 1e9
	t.mu.Unlock()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	out["seconds"] = span
	out["events_per_second"] = 0.0
	if span > 0 {
		out["events_per_second"] = float64(len(lat)) / span
	}
	out["latency_p50_us"] = pct(lat, 0.50) / 1e3
	out["latency_p99_us"] = pct(lat, 0.99) / 1e3
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}
