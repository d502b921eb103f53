package backend

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/internal/testutil/wait"
	"github.com/visualops/opsagent/protocol"
)

// The store suite: what any appStore must do so that no acknowledged
// StateLog is lost and no stored app is created over, whatever happens to
// its storage around a restart. runStoreSuite takes a harness per
// implementation; today's is the file store (TestFileStore), and the NATS
// JetStream store planned for the fleet must pass the same cases. A
// harness injects real faults where it can (for the file store: a small
// tmpfs that fills up, and a StateLog directory that cannot be read); a
// case whose fault the harness cannot make here is skipped, saying why.

// storeHarness is one appStore implementation made testable.
type storeHarness struct {
	// open opens the store on the harness's data; after a Close, that is a
	// restart.
	open func(t *testing.T) appStore
	// crash makes what is stored look as a kill -9 right after the last
	// acknowledgement leaves it (called after Close).
	crash func(t *testing.T)
	// fillDisk makes writes fail for lack of space until freeDisk; why
	// says why they are nil, when they are.
	fillDisk, freeDisk func(t *testing.T)
	noDisk             string
	// breakApp makes one app's stored data unreadable until repairApp.
	breakApp, repairApp func(t *testing.T, app string)
}

type storeCase struct {
	name       string
	disk, brk  bool // needs fillDisk, breakApp
	run        func(t *testing.T, h *storeHarness)
	serverSide bool // runs a Server on the store
}

func runStoreSuite(t *testing.T, newHarness func(t *testing.T) *storeHarness) {
	for _, c := range storeCases {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t)
			if c.disk && h.fillDisk == nil {
				t.Skip("this store cannot be given a full disk here: " + h.noDisk)
			}
			if c.brk && h.breakApp == nil {
				t.Skip("this store cannot be given an unreadable app here")
			}
			c.run(t, h)
		})
	}
}

var storeCases = []storeCase{
	{name: "AckedStateLogsSurviveARestart", run: caseAckedSurviveRestart},
	{name: "CreateNeverOverwritesAStoredApp", run: caseCreateNeverOverwrites},
	{name: "AppThatFailsToLoadIsKeptAndLoadsOnceRepaired", brk: true, run: caseFailedLoadKept},
	{name: "NothingIsWrittenToAnAppNotLoaded", run: caseNoWriteUnloaded},
	{name: "FullDiskRefusesStateLogsNeverAcksThem", disk: true, run: caseFullDiskRefuses},
	{name: "RestartOnAFullDiskAfterACrashLosesNothing", disk: true, run: caseFullDiskRestart},
	{name: "RevocationSurvivesARestart", run: caseRevocation},
	{name: "ServerRefusesAFailedAppAndRecoversWithoutRestart", brk: true, serverSide: true, run: caseServerFailedApp},
	{name: "ServerOnAFullDiskAfterACrashNeverResetsTheApp", disk: true, serverSide: true, run: caseServerFullDisk},
}

// TestFileStore runs the store suite on the file store.
func TestFileStore(t *testing.T) { runStoreSuite(t, fileHarness) }

// fileHarness keeps the store's data on a 4 MiB tmpfs when this process
// may mount one (root), so that the disk really fills up; otherwise in a
// temporary directory, and the full-disk cases are skipped.
func fileHarness(t *testing.T) *storeHarness {
	dir, err := tmpfsDir(t, 4<<20)
	h := &storeHarness{}
	lo := logOptions{segmentBytes: defaultSegment, retentionBytes: defaultRetention, retentionAge: defaultAge, maxOutput: defaultOutput, commitDelay: defaultCommit}
	h.open = func(t *testing.T) appStore {
		st := openFileStore(dir, lo, slog.New(slog.DiscardHandler))
		var once sync.Once
		t.Cleanup(func() { once.Do(func() { _ = st.Close() }) })
		return &closeOnce{appStore: st, once: &once}
	}
	// Segments are fsynced before an acknowledgement, streams.json at most
	// a second later: a kill -9 in that second leaves it out of date, or
	// (for a first save) absent.
	h.crash = func(t *testing.T) {
		paths, _ := filepath.Glob(filepath.Join(dir, "apps", "*", streamsFileName))
		for _, p := range paths {
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err == nil {
		filler := filepath.Join(dir, "filler")
		h.fillDisk = func(t *testing.T) { fillDisk(t, filler) }
		h.freeDisk = func(t *testing.T) {
			if err := os.Remove(filler); err != nil {
				t.Fatal(err)
			}
		}
	} else {
		h.noDisk = "mounting a tmpfs: " + err.Error() + " (needs root)"
	}
	// The StateLog directory made unreadable: chmod 000 for other users,
	// which root ignores; for root a regular file in its place (ReadDir
	// then fails with ENOTDIR), the directory kept aside.
	h.breakApp = func(t *testing.T, app string) {
		logs := logsDir(dir, app)
		if os.Geteuid() != 0 {
			if err := os.Chmod(logs, 0); err != nil {
				t.Fatal(err)
			}
			return
		}
		if err := os.Rename(logs, logs+".aside"); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(logs, []byte("not a directory\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	h.repairApp = func(t *testing.T, app string) {
		logs := logsDir(dir, app)
		if os.Geteuid() != 0 {
			if err := os.Chmod(logs, 0o700); err != nil {
				t.Fatal(err)
			}
			return
		}
		if err := os.Remove(logs); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(logs+".aside", logs); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

// closeOnce lets a case close a store early; the cleanup then does not
// close it again.
type closeOnce struct {
	appStore
	once *sync.Once
}

func (c *closeOnce) Close() error {
	var err error
	c.once.Do(func() { err = c.appStore.Close() })
	return err
}

// tmpfsDir mounts a tmpfs of size bytes on a temporary directory (a real
// filesystem that runs out of space), or returns the directory and why it
// could not.
func tmpfsDir(t *testing.T, size int) (string, error) {
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		return dir, err
	}
	// Registered after TempDir's: unmounted before it is removed.
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir, nil
}

// fillDisk writes path until the filesystem is full.
func fillDisk(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			return
		}
	}
}

// testAcker stands for an agent's connection.
type testAcker struct {
	mu      sync.Mutex
	high    int64
	refusal string
}

func (a *testAcker) ack(_ string, seq int64) {
	a.mu.Lock()
	a.high = max(a.high, seq)
	a.mu.Unlock()
}

func (a *testAcker) refuse(reason string) {
	a.mu.Lock()
	if a.refusal == "" {
		a.refusal = reason
	}
	a.mu.Unlock()
}

func (a *testAcker) refused() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.refusal != ""
}

func (a *testAcker) acked() int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.high
}

// fat is a StateLog output that needs fresh disk pages every time.
var fat = strings.Repeat("o", 5000)

// submit sends agent seqs from..to of i-1's stream "s" over one
// connection and waits until they are acknowledged or the connection is
// refused. A Submit error counts as a refusal.
func submit(t *testing.T, st appStore, app string, from, to int64) *testAcker {
	t.Helper()
	c := &testAcker{}
	for seq := from; seq <= to; seq++ {
		e := LogEntry{ReceivedAt: time.Now().UTC(), InstanceID: "i-1", LogStream: "s", AgentSeq: seq, RecipeVersion: 1,
			StateID: fmt.Sprintf("s%d", seq), Result: true, Stdout: &fat}
		if err := st.Submit(app, e, c); err != nil {
			c.refuse(err.Error())
			return c
		}
	}
	wait.Eventually(t, fmt.Sprintf("StateLogs %d..%d acknowledged or refused", from, to), func() bool { return c.acked() >= to || c.refused() })
	return c
}

// readAll reads every stored StateLog of app, page by page.
func readAll(t *testing.T, st appStore, app string) []LogEntry {
	t.Helper()
	var all []LogEntry
	for after := int64(0); ; {
		page, more, err := st.ReadLogs(app, after, 10000, maxPageBytes)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, page...)
		if len(page) > 0 {
			after = page[len(page)-1].Seq
		}
		if !more {
			return all
		}
	}
}

// checkLogs: agent seqs 1..n exactly once and in order, backend seqs
// strictly increasing, and the entries of before unchanged (same backend
// seq for the same agent seq: no seq given twice).
func checkLogs(t *testing.T, logs []LogEntry, n int64, before []LogEntry) {
	t.Helper()
	if got := agentSeqs(logs, "i-1", "s"); !slices.Equal(got, seqRange(1, n)) {
		t.Fatalf("stored agent seqs %v, want 1..%d each once", got, n)
	}
	for i := 1; i < len(logs); i++ {
		if logs[i].Seq <= logs[i-1].Seq {
			t.Fatalf("backend seq %d after %d: reused or out of order", logs[i].Seq, logs[i-1].Seq)
		}
	}
	for i, e := range before {
		if i >= len(logs) || logs[i].Seq != e.Seq || logs[i].AgentSeq != e.AgentSeq {
			t.Fatalf("entry %d was seq %d (agent seq %d) and is now %+v", i, e.Seq, e.AgentSeq, logs[min(i, len(logs)-1)])
		}
	}
}

// newStoredApp creates app1 at recipe version 3 with instance i-1 and n
// acknowledged StateLogs.
func newStoredApp(t *testing.T, st appStore, n int64) {
	t.Helper()
	a := newAppState("app1", "the-secret-0123456789")
	if err := st.CreateApp(a); err != nil {
		t.Fatal(err)
	}
	a.RecipeVersion = 3
	if err := st.SaveApp(a); err != nil {
		t.Fatal(err)
	}
	if err := st.AddInstance("app1", "i-1", hashToken(tok("1"))); err != nil {
		t.Fatal(err)
	}
	if n > 0 {
		if c := submit(t, st, "app1", 1, n); c.acked() != n {
			t.Fatalf("%d of %d StateLogs acknowledged (%s)", c.acked(), n, c.refusal)
		}
	}
}

// checkApp: app1 loads as newStoredApp left it, with n StateLogs.
func checkApp(t *testing.T, st appStore, n int64, before []LogEntry) {
	t.Helper()
	a, err := st.LoadApp("app1")
	if err != nil {
		t.Fatal(err)
	}
	if a.RecipeVersion != 3 || a.TokenHashes["i-1"] != hashToken(tok("1")) || a.Secret != "the-secret-0123456789" {
		t.Fatalf("app loaded as version %d, i-1's token %q, secret %q: want version 3, its token and its secret", a.RecipeVersion, a.TokenHashes["i-1"], a.Secret)
	}
	checkLogs(t, readAll(t, st, "app1"), n, before)
	if h := st.HighSeq("app1", "i-1", "s"); h != n {
		t.Fatalf("HighSeq %d, want %d", h, n)
	}
}

func caseAckedSurviveRestart(t *testing.T, h *storeHarness) {
	st := h.open(t)
	newStoredApp(t, st, 20)
	before := readAll(t, st, "app1")
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	h.crash(t)
	checkApp(t, h.open(t), 20, before)
}

func caseCreateNeverOverwrites(t *testing.T, h *storeHarness) {
	st := h.open(t)
	newStoredApp(t, st, 5)
	before := readAll(t, st, "app1")
	if err := st.CreateApp(newAppState("app1", "other-secret-0123456789")); !errors.Is(err, errAppExists) {
		t.Fatalf("CreateApp of a loaded app: %v, want errAppExists", err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st = h.open(t)
	if ids, err := st.AppIDs(); err != nil || !slices.Contains(ids, "app1") {
		t.Fatalf("AppIDs %v %v", ids, err)
	}
	if err := st.CreateApp(newAppState("app1", "other-secret-0123456789")); !errors.Is(err, errAppExists) {
		t.Fatalf("CreateApp of a stored app not loaded: %v, want errAppExists", err)
	}
	checkApp(t, st, 5, before)
	if _, err := st.LoadApp("nope"); !errors.Is(err, errNoApp) {
		t.Fatalf("LoadApp of an app never stored: %v, want errNoApp", err)
	}
}

func caseFailedLoadKept(t *testing.T, h *storeHarness) {
	st := h.open(t)
	newStoredApp(t, st, 10)
	before := readAll(t, st, "app1")
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	h.breakApp(t, "app1")
	st = h.open(t)
	if ids, err := st.AppIDs(); err != nil || !slices.Contains(ids, "app1") {
		t.Fatalf("AppIDs %v %v: the app must still be listed", ids, err)
	}
	for range 2 { // and again: a failed load leaves nothing half-loaded
		if _, err := st.LoadApp("app1"); err == nil || errors.Is(err, errNoApp) {
			t.Fatalf("LoadApp of an unreadable app: %v, want an error other than errNoApp", err)
		}
	}
	if err := st.CreateApp(newAppState("app1", "other-secret-0123456789")); !errors.Is(err, errAppExists) {
		t.Fatalf("CreateApp over an app that does not load: %v, want errAppExists", err)
	}
	if c := submit(t, st, "app1", 11, 12); c.acked() > 0 || !c.refused() {
		t.Fatalf("StateLogs of an app not loaded: acknowledged up to %d, refused %v", c.acked(), c.refused())
	}
	h.repairApp(t, "app1")
	checkApp(t, st, 10, before)
	if c := submit(t, st, "app1", 11, 12); c.acked() != 12 {
		t.Fatalf("after the repair: acknowledged up to %d (%s)", c.acked(), c.refusal)
	}
	checkLogs(t, readAll(t, st, "app1"), 12, before)
}

func caseNoWriteUnloaded(t *testing.T, h *storeHarness) {
	st := h.open(t)
	newStoredApp(t, st, 10)
	before := readAll(t, st, "app1")
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st = h.open(t)
	// The app is stored but this store has not loaded it: its StateLogs
	// were not read, so none may be written beside them.
	if c := submit(t, st, "app1", 11, 15); c.acked() > 0 || !c.refused() {
		t.Fatalf("StateLogs of an app not loaded: acknowledged up to %d, refused %v", c.acked(), c.refused())
	}
	checkApp(t, st, 10, before)
	if c := submit(t, st, "app1", 11, 15); c.acked() != 15 {
		t.Fatalf("once loaded: acknowledged up to %d (%s)", c.acked(), c.refusal)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st = h.open(t)
	if _, err := st.LoadApp("app1"); err != nil {
		t.Fatal(err)
	}
	checkLogs(t, readAll(t, st, "app1"), 15, before)
}

func caseFullDiskRefuses(t *testing.T, h *storeHarness) {
	st := h.open(t)
	newStoredApp(t, st, 10)
	before := readAll(t, st, "app1")
	h.fillDisk(t)
	for range 3 { // each attempt over a new connection, as an agent reconnects
		if c := submit(t, st, "app1", 11, 20); c.acked() > 10 || !c.refused() {
			t.Fatalf("on a full disk: acknowledged up to %d, refused %v", c.acked(), c.refused())
		}
	}
	checkLogs(t, readAll(t, st, "app1"), 10, before)
	if err := st.SaveApp(newAppState("app1", "x-secret-0123456789")); err == nil {
		t.Error("SaveApp on a full disk reported success")
	}
	h.freeDisk(t)
	if c := submit(t, st, "app1", 11, 20); c.acked() != 20 {
		t.Fatalf("after freeing the disk: acknowledged up to %d (%s)", c.acked(), c.refusal)
	}
	after := readAll(t, st, "app1")
	checkLogs(t, after, 20, before)
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	h.crash(t)
	st = h.open(t)
	if _, err := st.LoadApp("app1"); err != nil {
		t.Fatal(err)
	}
	checkLogs(t, readAll(t, st, "app1"), 20, after)
}

// caseFullDiskRestart is the sequence: a kill -9 soon after
// StateLogs were acknowledged, a restart on a full disk, StateLogs sent
// meanwhile, then the disk freed.
func caseFullDiskRestart(t *testing.T, h *storeHarness) {
	st := h.open(t)
	newStoredApp(t, st, 40)
	before := readAll(t, st, "app1")
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	h.crash(t)
	h.fillDisk(t)
	st = h.open(t)
	_, err := st.LoadApp("app1")
	loaded := err == nil
	t.Logf("LoadApp on a full disk: %v", err)
	if err != nil && errors.Is(err, errNoApp) {
		t.Fatalf("LoadApp on a full disk: %v; the app is stored", err)
	}
	if err := st.CreateApp(newAppState("app1", "other-secret-0123456789")); !errors.Is(err, errAppExists) {
		t.Fatalf("CreateApp on a full disk: %v, want errAppExists", err)
	}
	for range 3 {
		if c := submit(t, st, "app1", 41, 50); c.acked() > 40 || !c.refused() {
			t.Fatalf("StateLogs on a full disk: acknowledged up to %d, refused %v", c.acked(), c.refused())
		}
	}
	if loaded {
		checkLogs(t, readAll(t, st, "app1"), 40, before)
	}
	h.freeDisk(t)
	if !loaded {
		checkApp(t, st, 40, before)
	}
	if c := submit(t, st, "app1", 41, 50); c.acked() != 50 {
		t.Fatalf("after freeing the disk: acknowledged up to %d (%s)", c.acked(), c.refusal)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st = h.open(t)
	checkApp(t, st, 50, before)
}

func caseRevocation(t *testing.T, h *storeHarness) {
	st := h.open(t)
	newStoredApp(t, st, 0)
	if err := st.AddInstance("app1", "i-2", hashToken(tok("2"))); err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	if err := st.RevokeInstance("app1", "i-1", at); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	h.crash(t)
	st = h.open(t)
	a, err := st.LoadApp("app1")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := a.TokenHashes["i-1"]; ok || !a.Revoked["i-1"].Equal(at) || a.TokenHashes["i-2"] == "" {
		t.Fatalf("after a restart: tokens %v, revoked %v; want i-1 revoked at %v and forgotten, i-2 kept", a.TokenHashes, a.Revoked, at)
	}
	if err := st.AdmitInstance("app1", "i-1"); err != nil {
		t.Fatal(err)
	}
	if err := st.AddInstance("app1", "i-1", hashToken(tok("new"))); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st = h.open(t)
	if a, err = st.LoadApp("app1"); err != nil {
		t.Fatal(err)
	}
	if _, ok := a.Revoked["i-1"]; ok || a.TokenHashes["i-1"] != hashToken(tok("new")) {
		t.Fatalf("after admission and a new enrollment: tokens %v, revoked %v", a.TokenHashes, a.Revoked)
	}
}

// serverOn starts a Server (API and agent socket) on the harness's store;
// loads are retried on every access.
func serverOn(t *testing.T, h *storeHarness, dir string) *env {
	return newEnv(t, dir, func(o *Options) {
		o.newStore = func(Options) (appStore, error) { return h.open(t), nil }
		o.loadRetryMin, o.loadRetryMax = time.Nanosecond, time.Nanosecond
	})
}

// seedServer stores app1 through the API at recipe version 2, with i-1
// enrolled and n StateLogs acknowledged, and stops the server.
func seedServer(t *testing.T, h *storeHarness, dir string, n int64) {
	e := serverOn(t, h, dir)
	for v := 1; v <= 2; v++ {
		if code, out := e.api("PUT", "/api/apps/app1/recipe", recipeJSON); code != 200 {
			t.Fatalf("PUT: %d %v", code, out)
		}
	}
	a := e.connect2("i-1", "app1", "1", "s1")
	a.expectAck("s1")
	a.expectRecipe()
	a.push("i-1", "s1", 1, n, fat)
	e.stop()
}

// expectStorageRefusal: the API answers 503 naming the app, and the
// recipe version is not changed.
func expectStorageRefusal(t *testing.T, e *env) {
	t.Helper()
	for _, c := range []struct{ method, path, body string }{
		{"PUT", "/api/apps/app1/recipe", recipeJSON},
		{"POST", "/api/apps/app1/waits", `{"instance_id":"i-1","state_id":"w1"}`},
		{"POST", "/api/apps/app1/update", `{"version":"9.9"}`},
		{"POST", "/api/apps/app1/enrollment/rotate", `{}`},
	} {
		code, out := e.api(c.method, c.path, c.body)
		if msg, _ := out["error"].(string); code == http.StatusOK && c.method == "PUT" {
			t.Fatalf("%s %s answered 200 %v: the app was changed (created afresh?) while it could not be stored", c.method, c.path, out)
		} else if code != http.StatusServiceUnavailable || !strings.Contains(msg, "app1") && !strings.Contains(msg, "storage") {
			t.Errorf("%s %s: %d %v, want 503 naming the app or the storage", c.method, c.path, code, out)
		}
	}
}

// caseServerFailedApp: the app's StateLogs cannot be read at start. It is
// listed as failed; PUTs and other writes answer 503; Handshakes, of its
// instance or of a newcomer with the secret claiming its id, close 1013;
// once repaired it loads on the next access, with its version, tokens and
// StateLogs, without a restart.
func caseServerFailedApp(t *testing.T, h *storeHarness) {
	dir := t.TempDir()
	seedServer(t, h, dir, 10)
	h.breakApp(t, "app1")
	e := serverOn(t, h, dir)
	_, out := e.api("GET", "/api/apps", "")
	if apps, _ := out["apps"].([]any); len(apps) != 1 || apps[0].(map[string]any)["failed"] == nil {
		t.Fatalf("GET /api/apps: %v, want app1 listed as failed", out)
	}
	expectStorageRefusal(t, e)
	a := e.connect2("i-1", "app1", "1", "s1")
	a.expectClose(websocket.CloseTryAgainLater, "cannot load this app")
	thief := e.dial()
	id := identity("i-1", "app1", tok("thief"), "2.2", "the secret does not matter")
	thief.send(&protocol.Handshake{Identity: id})
	thief.expectClose(websocket.CloseTryAgainLater, "cannot load this app")

	h.repairApp(t, "app1")
	b := e.connect2("i-1", "app1", "1", "s1")
	if seq := b.expectAck("s1"); seq != 10 {
		t.Fatalf("after the repair: first StateLogAck %d, want 10", seq)
	}
	if r := b.expectRecipe(); r.RecipeVersion != 2 {
		t.Fatalf("after the repair: recipe version %d, want 2", r.RecipeVersion)
	}
	if code, out := e.api("PUT", "/api/apps/app1/recipe", recipeJSON); code != 200 || out["recipe_version"] != float64(3) {
		t.Fatalf("PUT after the repair: %d %v, want recipe_version 3", code, out)
	}
	e.handshake(identity("i-1", "app1", tok("thief"), "2.2", e.secret("app1"))).expectClose(websocket.ClosePolicyViolation, "instance token mismatch")
	if got := agentSeqs(e.storedLogs("app1", 100), "i-1", "s1"); !slices.Equal(got, seqRange(1, 10)) {
		t.Fatalf("stored %v", got)
	}
}

// caseServerFullDisk: a kill -9, then a restart on a full disk. Nothing
// is acknowledged that is not stored, the app is never reset (version,
// tokens), and once the disk is freed the agent's resent StateLogs are
// stored and acknowledged.
func caseServerFullDisk(t *testing.T, h *storeHarness) {
	dir := t.TempDir()
	seedServer(t, h, dir, 40)
	h.crash(t)
	h.fillDisk(t)
	e := serverOn(t, h, dir)
	// Whether the app loads on a full disk is the store's business; if it
	// does, StateLogs are refused, else the Handshake is.
	a := e.connect2("i-1", "app1", "1", "s1")
	m, err := a.next()
	var ce *websocket.CloseError
	switch {
	case errors.As(err, &ce):
		if ce.Code != websocket.CloseTryAgainLater {
			t.Fatalf("on a full disk: closed %d %q, want 1013 or a welcome", ce.Code, ce.Text)
		}
		t.Log("on a full disk the app did not load: the Handshake was refused")
	case err != nil:
		t.Fatal(err)
	default:
		if ack, ok := m.(*protocol.StateLogAck); !ok || ack.Seq != 40 {
			t.Fatalf("on a full disk: first frame %#v, want StateLogAck 40", m)
		}
		t.Log("on a full disk the app loaded: its StateLogs are refused")
		a.expectRecipe()
		for seq := int64(41); seq <= 45; seq++ { // each needs new disk pages
			m := stateLog("i-1", seq)
			m.Stdout = &fat
			a.send(m)
		}
		for {
			m, err := a.next()
			if errors.As(err, &ce) {
				if ce.Code != websocket.CloseInternalServerErr {
					t.Fatalf("StateLogs on a full disk: closed %d %q, want 1011", ce.Code, ce.Text)
				}
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if ack, ok := m.(*protocol.StateLogAck); ok && ack.Seq > 40 {
				t.Fatalf("StateLogAck %d on a full disk: nothing past 40 is stored", ack.Seq)
			}
		}
	}
	code, out := e.api("PUT", "/api/apps/app1/recipe", recipeJSON)
	if code != http.StatusServiceUnavailable {
		t.Fatalf("PUT on a full disk: %d %v, want 503", code, out)
	}
	h.freeDisk(t)
	b := e.connect2("i-1", "app1", "1", "s1")
	if seq := b.expectAck("s1"); seq != 40 {
		t.Fatalf("after freeing the disk: first StateLogAck %d, want 40", seq)
	}
	b.expectRecipe()
	b.push("i-1", "s1", 41, 45, fat)
	if code, out := e.api("PUT", "/api/apps/app1/recipe", recipeJSON); code != 200 || out["recipe_version"] != float64(3) {
		t.Fatalf("PUT after freeing the disk: %d %v, want recipe_version 3 (never back to 1)", code, out)
	}
	e.handshake(identity("i-1", "app1", tok("thief"), "2.2", e.secret("app1"))).expectClose(websocket.ClosePolicyViolation, "instance token mismatch")
	e.stop()
	e2 := serverOn(t, h, dir)
	if got := agentSeqs(e2.storedLogs("app1", 100), "i-1", "s1"); !slices.Equal(got, seqRange(1, 45)) {
		t.Fatalf("stored after a restart %v, want 1..45", got)
	}
}
