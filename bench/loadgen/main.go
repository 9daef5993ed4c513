// fsload: a small, low-CPU gRPC load generator for unary calls with pre-serialised requests.
//
// Requests come from a file of varint-length-delimited protobuf messages (written by
// bench/data.py); request i sends message (offset+i) mod n, as raw bytes (no proto schema
// needed), so the same tool drives our FraudScoring/Score and MLServer's ModelInfer.
//
// Closed loop (-mode closed): -c workers each send the next request as soon as the previous
// answer arrives; latency = answer time - send time.
//
// Open loop (-mode open): request i is scheduled at start + i/rps and sent from its own
// goroutine at that instant, whatever is still in flight; latency = answer time - SCHEDULED
// time, so a server (or client) that falls behind shows up in the percentiles (no coordinated
// omission). Also reported: "service" latency (answer - actual send) and the send lag.
//
// -throttle-k K: each call first asks the client's adaptive throttle (fraudscore_client/_throttle.py,
// the same rule: over the last 10 s, refuse locally with probability
// max(0, (requests - K*accepts) / (requests + 8)); an answer that is not RESOURCE_EXHAUSTED is an
// accept; a sent call is counted when it ends; a locally refused one at once, as a request only in
// a second in which the service refused some sent calls). A locally refused call is not sent and
// is counted under the code "ThrottledLocally".
//
// Each call carries its timeout as the metadata x-fraudscore-timeout-ms (-send-timeout, on by
// default), as fraudscore_client does: the service measures from it each call's wait before its
// handler.
//
// Output: one JSON object on stdout (or -out FILE).
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// rawCodec passes pre-serialised bytes through unchanged.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	p := v.(*[]byte)
	*p = append((*p)[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" } // same content-subtype as real protobuf

var _ encoding.Codec = rawCodec{}

// throttle: adaptive throttling, as fraudscore_client._throttle.AdaptiveThrottle (1 s buckets).
type throttle struct {
	mu      sync.Mutex
	k       float64
	sent    []int // per second of the window: sent calls whose outcome is known
	accepts []int
	local   []int // calls refused locally
	current int64
	rng     *rand.Rand
}

func (t *throttle) advance() int {
	now := time.Now().Unix()
	if now != t.current {
		n := int64(len(t.sent))
		for step := int64(0); step < now-t.current && step < n; step++ {
			slot := (t.current + 1 + step) % n
			t.sent[slot], t.accepts[slot], t.local[slot] = 0, 0, 0
		}
		t.current = now
	}
	return int(now % int64(len(t.sent)))
}

// allow says whether to send a call; a refusal is counted at once, a sent call by outcome.
func (t *throttle) allow() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	slot := t.advance()
	req, acc := 0, 0
	for i := range t.sent {
		req += t.sent[i]
		acc += t.accepts[i]
		if t.sent[i] > t.accepts[i] { // local refusals count only in a second the service refused in
			req += t.local[i]
		}
	}
	p := math.Max(0, (float64(req)-t.k*float64(acc))/float64(req+8))
	if p > 0 && t.rng.Float64() < p {
		t.local[slot]++
		return false
	}
	return true
}

// outcome counts a sent call once it ended: accepted unless refused for overload.
func (t *throttle) outcome(accepted bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	slot := t.advance()
	t.sent[slot]++
	if accepted {
		t.accepts[slot]++
	}
}

type sample struct {
	schedNs int64 // scheduled (open) or actual (closed) start, ns since run start
	sendNs  int64
	doneNs  int64
	code    codes.Code
	local   bool  // refused by the client's throttle, never sent
	enumVal int32 // value of -enum-field in the response (-1 = absent/not asked)
	flag    bool  // value of -flag-field in the response
}

func readMessages(path string) ([][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 1<<20)
	var out [][]byte
	for {
		n, err := binary.ReadUvarint(r)
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		b := make([]byte, n)
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no messages in %s", path)
	}
	return out, nil
}

// scanFields reads a top-level varint field (enum) and a bool field of a response.
func scanFields(b []byte, enumField, flagField int) (int32, bool) {
	ev := int32(-1)
	fl := false
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			break
		}
		b = b[n:]
		if typ == protowire.VarintType {
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				break
			}
			if int(num) == enumField {
				ev = int32(v)
			} else if int(num) == flagField {
				fl = v != 0
			}
			b = b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			break
		}
		b = b[m:]
	}
	return ev, fl
}

func pct(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return sorted[i]
}

func summary(v []float64) map[string]any {
	sort.Float64s(v)
	if len(v) == 0 {
		return map[string]any{"n": 0}
	}
	sum := 0.0
	for _, x := range v {
		sum += x
	}
	return map[string]any{
		"n": len(v), "mean": sum / float64(len(v)), "min": v[0], "p50": pct(v, 50), "p90": pct(v, 90),
		"p95": pct(v, 95), "p99": pct(v, 99), "p999": pct(v, 99.9), "max": v[len(v)-1],
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address")
	method := flag.String("method", "/fraudscore.v1.FraudScoring/Score", "full gRPC method name")
	dataPath := flag.String("data", "", "file of varint-delimited serialised requests")
	offset := flag.Int("offset", 0, "index of the first request in the data file")
	mode := flag.String("mode", "closed", "closed or open")
	conc := flag.Int("c", 1, "closed loop: concurrent workers")
	rps := flag.Float64("rps", 100, "open loop: arrival rate (requests/s)")
	conns := flag.Int("conns", 1, "gRPC connections (HTTP/2), requests spread round-robin")
	duration := flag.Duration("duration", 10*time.Second, "measured duration (after warm-up)")
	warmup := flag.Duration("warmup", 2*time.Second, "warm-up, not in the statistics")
	timeout := flag.Duration("timeout", 2*time.Second, "per-call deadline")
	maxInflight := flag.Int("max-inflight", 20000, "open loop: requests in flight beyond this are not sent (counted as client_dropped)")
	enumField := flag.Int("enum-field", 0, "count the values of this top-level varint field of the responses (0 = off)")
	flagField := flag.Int("flag-field", 0, "count responses with this top-level bool field set (0 = off)")
	out := flag.String("out", "", "write the JSON here instead of stdout")
	sendTimeout := flag.Bool("send-timeout", true, "send each call's timeout as x-fraudscore-timeout-ms, as fraudscore_client does")
	throttleK := flag.Float64("throttle-k", 0, "adaptive client throttling with this K (0 = off), as fraudscore_client")
	throttleWindow := flag.Int("throttle-window", 5, "the throttle's window, whole seconds")
	flag.Parse()

	msgs, err := readMessages(*dataPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fsload:", err)
		os.Exit(2)
	}
	if *conns < 1 {
		*conns = 1
	}
	cc := make([]*grpc.ClientConn, *conns)
	for i := range cc {
		c, err := grpc.Dial(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})),
			grpc.WithInitialWindowSize(1<<20), grpc.WithInitialConnWindowSize(1<<22))
		if err != nil {
			fmt.Fprintln(os.Stderr, "fsload:", err)
			os.Exit(2)
		}
		c.Connect()
		cc[i] = c
	}
	// Wait until every connection is up (an unready connection would add its set-up to the first calls).
	ctxReady, cancelReady := context.WithTimeout(context.Background(), 10*time.Second)
	for _, c := range cc {
		for s := c.GetState(); s.String() != "READY"; s = c.GetState() {
			if !c.WaitForStateChange(ctxReady, s) {
				fmt.Fprintln(os.Stderr, "fsload: connection not ready:", s)
				os.Exit(2)
			}
		}
	}
	cancelReady()

	total := *warmup + *duration
	var samples []sample
	var mu sync.Mutex
	var seq atomic.Int64
	var inflight atomic.Int64
	var maxSeen atomic.Int64
	var dropped atomic.Int64
	wrapped := false

	timeoutMs := fmt.Sprintf("%.1f", float64(*timeout)/1e6)
	var thr *throttle
	if *throttleK > 0 {
		w := max(*throttleWindow, 1)
		thr = &throttle{k: *throttleK, sent: make([]int, w), accepts: make([]int, w), local: make([]int, w),
			current: time.Now().Unix(), rng: rand.New(rand.NewSource(1))}
	}
	start := time.Now()
	call := func(i int64, sched time.Duration, conn *grpc.ClientConn) sample {
		idx := (int64(*offset) + i) % int64(len(msgs))
		req := msgs[idx]
		if thr != nil && !thr.allow() {
			now := int64(time.Since(start))
			return sample{schedNs: int64(sched), sendNs: now, doneNs: now, code: codes.ResourceExhausted, local: true, enumVal: -1}
		}
		var resp []byte
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		if *sendTimeout {
			ctx = metadata.AppendToOutgoingContext(ctx, "x-fraudscore-timeout-ms", timeoutMs)
		}
		send := time.Since(start)
		err := conn.Invoke(ctx, *method, &req, &resp)
		done := time.Since(start)
		cancel()
		if thr != nil {
			thr.outcome(status.Code(err) != codes.ResourceExhausted)
		}
		s := sample{schedNs: int64(sched), sendNs: int64(send), doneNs: int64(done), code: status.Code(err), enumVal: -1}
		if err == nil && (*enumField > 0 || *flagField > 0) {
			s.enumVal, s.flag = scanFields(resp, *enumField, *flagField)
		}
		return s
	}

	if *mode == "closed" {
		var wg sync.WaitGroup
		deadline := start.Add(total)
		for w := 0; w < *conc; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				local := make([]sample, 0, 4096)
				conn := cc[w%len(cc)]
				for time.Now().Before(deadline) {
					i := seq.Add(1) - 1
					s := call(i, time.Since(start), conn)
					s.schedNs = s.sendNs
					local = append(local, s)
				}
				mu.Lock()
				samples = append(samples, local...)
				mu.Unlock()
			}(w)
		}
		wg.Wait()
	} else if *mode == "open" {
		var wg sync.WaitGroup
		interval := float64(time.Second) / *rps
		n := int64(float64(total) / interval)
		results := make(chan sample, 65536)
		collected := make(chan struct{})
		go func() {
			for s := range results {
				samples = append(samples, s)
			}
			close(collected)
		}()
		for i := int64(0); i < n; i++ {
			sched := time.Duration(float64(i) * interval)
			if d := sched - time.Since(start); d > 0 {
				time.Sleep(d)
			}
			if inflight.Load() >= int64(*maxInflight) {
				dropped.Add(1)
				continue
			}
			v := inflight.Add(1)
			if v > maxSeen.Load() {
				maxSeen.Store(v)
			}
			wg.Add(1)
			go func(i int64, sched time.Duration) {
				defer wg.Done()
				s := call(i, sched, cc[i%int64(len(cc))])
				inflight.Add(-1)
				results <- s
			}(i, sched)
		}
		seq.Store(n)
		wg.Wait()
		close(results)
		<-collected
	} else {
		fmt.Fprintln(os.Stderr, "fsload: -mode must be closed or open")
		os.Exit(2)
	}
	end := time.Since(start)
	if seq.Load() > int64(len(msgs)) {
		wrapped = true
	}

	// Statistics over requests scheduled after the warm-up and before the end of the run.
	wu := int64(*warmup)
	lat := []float64{}
	svc := []float64{}
	lag := []float64{}
	codeCounts := map[string]int{}
	enumCounts := map[string]int{}
	flagCount := 0
	ok := 0
	var firstDone, lastDone int64 = math.MaxInt64, 0
	for _, s := range samples {
		if s.schedNs < wu || s.schedNs >= int64(total) {
			continue
		}
		if s.local {
			codeCounts["ThrottledLocally"]++
		} else {
			codeCounts[s.code.String()]++
		}
		if s.code == codes.OK {
			ok++
			lat = append(lat, float64(s.doneNs-s.schedNs)/1e6)
			svc = append(svc, float64(s.doneNs-s.sendNs)/1e6)
			if s.enumVal >= 0 {
				enumCounts[fmt.Sprint(s.enumVal)]++
			}
			if s.flag {
				flagCount++
			}
		}
		lag = append(lag, float64(s.sendNs-s.schedNs)/1e6)
		if s.doneNs < firstDone {
			firstDone = s.doneNs
		}
		if s.doneNs > lastDone {
			lastDone = s.doneNs
		}
	}
	measured := 0
	for _, v := range codeCounts {
		measured += v
	}
	// Achieved rate: OK answers to requests scheduled in the measured window, over that window
	// (for an open loop that fell behind, the answers that came after it still count, over the
	// time they took to come).
	window := float64(*duration) / 1e9
	if lastDone > int64(total) {
		window = float64(lastDone-wu) / 1e9
	}
	res := map[string]any{
		"mode": *mode, "method": *method, "addr": *addr, "connections": *conns,
		"concurrency": *conc, "target_rps": nil, "duration_s": float64(*duration) / 1e9,
		"warmup_s": float64(*warmup) / 1e9, "timeout_s": float64(*timeout) / 1e9,
		"requests_total": len(samples), "requests_measured": measured, "ok": ok, "errors": measured - ok,
		"codes": codeCounts, "achieved_rps": float64(ok) / window, "wall_s": float64(end) / 1e9,
		"latency_ms":         summary(lat),
		"service_latency_ms": summary(svc),
		"send_lag_ms":        summary(lag),
		"data_messages":      len(msgs), "data_offset": *offset, "data_used": seq.Load(), "data_wrapped": wrapped,
	}
	if *mode == "open" {
		res["target_rps"] = *rps
		res["client_dropped"] = dropped.Load()
		res["max_inflight"] = maxSeen.Load()
		res["concurrency"] = nil
	}
	if *enumField > 0 {
		res["enum_field"] = *enumField
		res["enum_counts"] = enumCounts
	}
	if *flagField > 0 {
		res["flag_field"] = *flagField
		res["flag_count"] = flagCount
	}
	enc, _ := json.MarshalIndent(res, "", "  ")
	if *out != "" {
		if err := os.WriteFile(*out, enc, 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "fsload:", err)
			os.Exit(2)
		}
	} else {
		os.Stdout.Write(enc)
		fmt.Println()
	}
	for _, c := range cc {
		c.Close()
	}
}
