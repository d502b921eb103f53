package backend

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/protocol"
)

// BenchmarkStoreStateLogs measures the StateLog path end to end.
//
//	go test -run '^$' -bench BenchmarkStoreStateLogs -benchtime 3x ./backend/
func BenchmarkStoreStateLogs(b *testing.B) {
	b.Run("push10k", benchPush)
	b.Run("instances-heap", benchInstancesHeap)
}

// benchPush: one protocol-2 connection sends 10 000 StateLogs through a
// real server and websocket client and waits for the ack of the last.
func benchPush(b *testing.B) {
	const n = 10000
	e := newEnv(b, "", nil)
	e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	frames := make([][]byte, n)
	for i := range frames {
		frames[i], _ = protocol.Encode(stateLog("i-1", int64(i+1)))
	}
	iterations := 0
	for b.Loop() {
		stream := fmt.Sprintf("bench-%d", iterations)
		a := e.connect2("i-1", "app1", "tok", stream)
		a.expectAck(stream)
		a.expectRecipe()
		for _, f := range frames {
			if err := a.ws.WriteMessage(websocket.TextMessage, f); err != nil {
				b.Fatal(err)
			}
		}
		a.waitAck(stream, n)
		a.ws.Close()
		iterations++
	}
	b.ReportMetric(float64(n*iterations)/b.Elapsed().Seconds(), "StateLogs/s")
}

// benchInstancesHeap: peak heap of listing the instances of an app with
// 200 MiB of StateLogs, reading every log as the backend did before
// (before-MiB) and from the summaries (after-MiB, a real GET).
func benchInstancesHeap(b *testing.B) {
	dir := b.TempDir()
	setup := newEnv(b, dir, nil)
	setup.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	setup.stop()
	const instances = 100
	writeBenchLogs(b, dir, instances, 200<<20, strings.Repeat("o", 60<<10))
	t0 := time.Now()
	e := newEnv(b, dir, nil)
	start := time.Since(t0)
	var before, after uint64
	for b.Loop() {
		before = max(before, peakHeap(func() { readEveryLog(b, e.srv) }))
		after = max(after, peakHeap(func() { getDiscard(b, e, "/api/apps/app1/instances") }))
	}
	b.ReportMetric(float64(before)/(1<<20), "before-MiB")
	b.ReportMetric(float64(after)/(1<<20), "after-MiB")
	b.ReportMetric(start.Seconds(), "start-s")
}

// readEveryLog is listInstances as it was: every log into memory, then
// the last one per instance.
func readEveryLog(b *testing.B, s *Server) {
	logs, _, err := fileLogs(s).read("app1", 0, int(^uint(0)>>1), int(^uint(0)>>1))
	if err != nil {
		b.Fatal(err)
	}
	last := map[string]*LogEntry{}
	for i := range logs {
		last[logs[i].InstanceID] = &logs[i]
	}
	data, _ := json.Marshal(last)
	runtime.KeepAlive(data)
}

func getDiscard(b *testing.B, e *env, path string) {
	resp, err := http.DefaultClient.Do(e.request("GET", path, ""))
	if err != nil {
		b.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b.Fatalf("GET %s: %d", path, resp.StatusCode)
	}
}

// peakHeap is the highest HeapInuse above the starting point while f runs,
// sampled every millisecond.
func peakHeap(f func()) uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	var peak atomic.Uint64
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > base && ms.HeapInuse-base > peak.Load() {
				peak.Store(ms.HeapInuse - base)
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	f()
	close(stop)
	<-stopped
	return peak.Load()
}

// writeBenchLogs writes total bytes of StateLogs spread over instances
// straight into segments, and enrolls the instances.
func writeBenchLogs(b *testing.B, dir string, instances int, total int64, stdout string) {
	ldir := logsDir(dir, "app1")
	if err := os.MkdirAll(ldir, 0o700); err != nil {
		b.Fatal(err)
	}
	var tokens []byte
	for i := range instances {
		line, _ := json.Marshal(tokenLine{InstanceID: fmt.Sprintf("i-%d", i), Hash: hashToken(tok("x"))})
		tokens = append(append(tokens, line...), '\n')
	}
	if err := os.WriteFile(filepath.Join(dir, "apps", "app1", "tokens.jsonl"), tokens, 0o600); err != nil {
		b.Fatal(err)
	}
	var f *os.File
	var size, written int64
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for seq := int64(1); written < total; seq++ {
		k := (seq - 1) % int64(instances)
		e := LogEntry{ReceivedAt: at, InstanceID: fmt.Sprintf("i-%d", k), LogStream: "s", AgentSeq: (seq-1)/int64(instances) + 1,
			RecipeVersion: 1, StateID: "s1", Result: true, Stdout: &stdout}
		rest, _ := encodeRest(e)
		line := appendLine(nil, seq, rest)
		if f == nil || size+int64(len(line)) > defaultSegment {
			if f != nil {
				f.Close()
			}
			var err error
			if f, err = os.Create(segmentPath(ldir, seq)); err != nil {
				b.Fatal(err)
			}
			size = 0
		}
		if _, err := f.Write(line); err != nil {
			b.Fatal(err)
		}
		size += int64(len(line))
		written += int64(len(line))
	}
	f.Close()
}
