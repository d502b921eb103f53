package backend

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/visualops/opsagent/internal/fsutil"
)

// Earlier versions kept everything in <data>/apps/<app>/: app.json (recipe,
// version, update offer, released waits), enroll.secret, tokens.jsonl
// (token hashes, revocations, admissions), logs/<first seq>.jsonl segments
// of StateLogs (logs.jsonl before segments), and streams.json (the highest
// agent seq per log stream, kept beyond retention). The first start of
// this version imports it into NATS (embedded or cluster) before serving,
// so that nothing is lost: each app's StateLogs keep their seqs (API
// cursors stay valid) and their agent seqs, its log streams their
// high-water marks (so what an agent sends again is still a duplicate),
// its instances their tokens and revocations. The app's record is written
// last, marked with the import's id: an interrupted import runs again at
// the next start and takes up where it stopped (an app whose record is
// there is done; StateLogs resume after the stream's last seq).
// <data>/nats-import.json records the import; once it says done, the
// import never runs again. The old files are left as they were.

const importMarker = "nats-import.json"

// importState is <data>/nats-import.json.
type importState struct {
	ID        string    `json:"id"`
	Done      bool      `json:"done"`
	StartedAt time.Time `json:"started_at"`
	Apps      int       `json:"apps,omitempty"`
	StateLogs int64     `json:"statelogs,omitempty"`
}

// oldApp is app.json of the file store.
type oldApp struct {
	appRecord
	Waits map[string][]string `json:"waits"`
}

// oldTokenLine is one line of tokens.jsonl.
type oldTokenLine struct {
	InstanceID string     `json:"instance_id"`
	Hash       string     `json:"sha256,omitempty"`
	Revoked    *time.Time `json:"revoked,omitempty"`
	Admitted   bool       `json:"admitted,omitempty"`
}

// oldStreams is streams.json.
type oldStreams struct {
	LogSeq  int64                       `json:"log_seq"`
	Streams map[string]map[string]int64 `json:"streams"`
}

// importDataDir imports <dir>/apps once (see above).
func importDataDir(ctx context.Context, dir string, st *natsStore, log *slog.Logger) error {
	appsDir := filepath.Join(dir, "apps")
	entries, err := os.ReadDir(appsDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("import of %s: %w (fix its permissions)", appsDir, err)
	}
	markerPath := filepath.Join(dir, importMarker)
	var state importState
	data, err := os.ReadFile(markerPath)
	switch {
	case err == nil:
		if err := json.Unmarshal(data, &state); err != nil || state.ID == "" {
			return fmt.Errorf("import: %s does not decode (%v): remove it to import %s again (what is imported already is kept)", markerPath, err, appsDir)
		}
		if state.Done {
			return nil
		}
		log.Info("resuming the import of the data directory into NATS", "apps", appsDir, "import_id", state.ID)
	case errors.Is(err, fs.ErrNotExist):
		state = importState{ID: newSession(), StartedAt: time.Now().UTC()}
		if err := writeJSONFile(markerPath, state); err != nil {
			return fmt.Errorf("import: %w", err)
		}
		log.Info("importing the data directory of an earlier version into NATS JetStream (once)", "apps", appsDir, "import_id", state.ID)
	default:
		return fmt.Errorf("import: %s: %w", markerPath, err)
	}
	begin := time.Now()
	for _, e := range entries {
		if !e.IsDir() || validAppID(e.Name()) != nil {
			continue // temporary directories of the file store start with '.'
		}
		n, imported, err := importApp(ctx, st, filepath.Join(appsDir, e.Name()), e.Name(), state.ID, log)
		if err != nil {
			return fmt.Errorf("import of app %s from %s: %w (nothing is lost: fix it and start again; the import resumes)", e.Name(), appsDir, err)
		}
		if imported {
			state.Apps++
			state.StateLogs += n
		}
	}
	state.Done = true
	if err := writeJSONFile(markerPath, state); err != nil {
		return fmt.Errorf("import: %w", err)
	}
	log.Info("imported the data directory into NATS JetStream; its files are left as they were (remove <data>/apps once you are satisfied)",
		"apps", state.Apps, "statelogs", state.StateLogs, "took", time.Since(begin).Round(time.Millisecond))
	return nil
}

func writeJSONFile(path string, v any) error {
	data, _ := json.MarshalIndent(v, "", "  ")
	return fsutil.WriteFileAtomic(path, append(data, '\n'), 0o600)
}

// importApp imports one app; imported is false when it was done before.
func importApp(ctx context.Context, st *natsStore, dir, id, importID string, log *slog.Logger) (int64, bool, error) {
	var old oldApp
	data, err := os.ReadFile(filepath.Join(dir, "app.json"))
	if errors.Is(err, fs.ErrNotExist) {
		if entries, _ := os.ReadDir(dir); len(entries) == 0 {
			return 0, false, nil
		}
		return 0, false, fmt.Errorf("app.json is missing while %s holds other files of the app: restore app.json from a backup (or, if the app never existed, remove the directory)", dir)
	}
	if err != nil {
		return 0, false, err
	}
	if err := json.Unmarshal(data, &old); err != nil {
		return 0, false, fmt.Errorf("app.json: %w (restore it from a backup)", err)
	}
	if old.AppID != id {
		return 0, false, fmt.Errorf("app.json names app %q: restore it from a backup", old.AppID)
	}
	rec, _, err := st.getApp(ctx, id)
	switch {
	case err == nil && rec.Imported == importID:
		return 0, false, nil // done by an earlier, interrupted start
	case err == nil || !errors.Is(err, errNoApp):
		return 0, false, fmt.Errorf("it is stored in NATS already (%v), so importing it would overwrite it: move %s aside to leave it out of the import", err, dir)
	}

	n, err := importLogs(ctx, st, dir, id)
	if err != nil {
		return n, false, fmt.Errorf("StateLogs: %w", err)
	}
	if err := importTokens(ctx, st, dir, id); err != nil {
		return n, false, err
	}
	secret, err := os.ReadFile(filepath.Join(dir, "enroll.secret"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return n, false, fmt.Errorf("enroll.secret: %w", err)
	}
	if s := strings.TrimSpace(string(secret)); s != "" {
		if _, err := st.putSecret(ctx, id, s); err != nil {
			return n, false, err
		}
	} // else one is made on first use (secretOf)
	for inst, states := range old.Waits {
		for _, state := range states {
			if _, err := st.releaseWait(ctx, id, old.RecipeVersion, inst, state); err != nil {
				return n, false, err
			}
		}
	}
	rec = old.appRecord
	rec.Imported = importID
	if rec.States == nil {
		rec.States = []stateJSON{}
	}
	data, _ = json.Marshal(rec)
	cctx, cancel := opCtx(ctx)
	defer cancel()
	if _, err := st.apps.Create(cctx, esc(id), data); err != nil {
		return n, false, fmt.Errorf("bucket %s: %w", bucketApps, err)
	}
	log.Info("imported an app", "app_id", id, "recipe_version", rec.RecipeVersion, "statelogs", n)
	return n, true, nil
}

// importTokens replays tokens.jsonl: the first hash of an instance holds
// until a revocation, which bars the id until an admission.
func importTokens(ctx context.Context, st *natsStore, dir, app string) error {
	f, err := os.Open(filepath.Join(dir, "tokens.jsonl"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("tokens.jsonl: %w", err)
	}
	defer f.Close()
	recs := map[string]instanceRecord{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var l oldTokenLine
		if json.Unmarshal(sc.Bytes(), &l) != nil || l.InstanceID == "" {
			continue
		}
		switch r, seen := recs[l.InstanceID]; {
		case l.Revoked != nil:
			at := l.Revoked.UTC()
			recs[l.InstanceID] = instanceRecord{RevokedAt: &at}
		case l.Admitted:
			delete(recs, l.InstanceID)
		case l.Hash != "" && (!seen || r.SHA256 == "" && r.RevokedAt == nil):
			recs[l.InstanceID] = instanceRecord{SHA256: l.Hash}
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("tokens.jsonl: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	for inst, r := range recs {
		data, _ := json.Marshal(r)
		if _, err := st.instances.Put(ctx, instanceKey(app, inst), data); err != nil {
			return fmt.Errorf("bucket %s: %w", bucketInstances, err)
		}
	}
	return nil
}

// importLogs copies an app's StateLogs into its stream with their seqs:
// the stream starts at the first one kept, and a seq the file store never
// used (a failed write) is taken by a placeholder, deleted afterwards.
func importLogs(ctx context.Context, st *natsStore, dir, app string) (int64, error) {
	var streams oldStreams
	if data, err := os.ReadFile(filepath.Join(dir, "streams.json")); err == nil {
		_ = json.Unmarshal(data, &streams) // unreadable: the highs come from the StateLogs themselves
	}
	sources, err := logSources(dir)
	if err != nil {
		return 0, err
	}
	first := uint64(max(streams.LogSeq+1, 1))
	if len(sources) > 0 {
		if seq, ok, err := firstSeq(sources); err != nil {
			return 0, err
		} else if ok {
			first = uint64(seq)
		}
	}
	cctx, cancel := opCtx(ctx)
	err = st.ensureLogStream(cctx, app, first)
	cancel()
	if err != nil {
		return 0, err
	}
	s, err := st.streamFor(ctx, app)
	if err != nil {
		return 0, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return 0, err
	}
	// Stored already by an interrupted import: resume after it.
	last := int64(info.State.LastSeq)
	if info.State.Msgs == 0 && info.State.FirstSeq > 0 {
		last = int64(info.State.FirstSeq) - 1
	}
	imp := &logImport{st: st, app: app, last: last, highs: map[streamKey]int64{}, lasts: map[streamKey]*LogEntry{}}
	for _, src := range sources {
		if err := imp.file(ctx, src); err != nil {
			return imp.n, err
		}
	}
	if err := imp.wait(ctx); err != nil {
		return imp.n, err
	}
	for _, seq := range imp.gaps {
		cctx, cancel := opCtx(ctx)
		err := s.DeleteMsg(cctx, seq)
		cancel()
		if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			return imp.n, fmt.Errorf("deleting placeholder %d: %w", seq, err)
		}
	}
	for inst, byStream := range streams.Streams {
		for stream, high := range byStream {
			k := streamKey{inst, stream}
			imp.highs[k] = max(imp.highs[k], high)
		}
	}
	keys := map[streamKey]bool{}
	for k := range imp.highs {
		keys[k] = true
	}
	for k := range imp.lasts {
		keys[k] = true
	}
	for k := range keys {
		sum := streamSummary{High: imp.highs[k], Last: imp.lasts[k]}
		if sum.Last != nil {
			cp := *sum.Last
			cp.Comment, cp.Stdout = capOutput(cp.Comment, summaryOutput), capOutput(cp.Stdout, summaryOutput)
			sum.Last = &cp
		}
		data, _ := json.Marshal(sum)
		cctx, cancel := opCtx(ctx)
		_, err := st.logstreams.Put(cctx, summaryKey(app, k.instance, k.stream), data)
		cancel()
		if err != nil {
			return imp.n, fmt.Errorf("bucket %s: %w", bucketLogStreams, err)
		}
	}
	return imp.n, nil
}

type streamKey struct{ instance, stream string }

// logSources are the app's StateLog files in the order their seqs come:
// the single file of the earliest versions (its StateLogs were moved into
// segments keeping their seqs, so it comes first and what is in both is
// skipped by seq), then the segments by first seq.
func logSources(dir string) ([]string, error) {
	var out []string
	legacy := filepath.Join(dir, "logs.jsonl")
	if _, err := os.Stat(legacy); err == nil {
		out = append(out, legacy)
	}
	entries, err := os.ReadDir(filepath.Join(dir, "logs"))
	if errors.Is(err, fs.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, fmt.Errorf("logs directory: %w", err)
	}
	type seg struct {
		first int64
		path  string
	}
	var segs []seg
	for _, e := range entries {
		num, ok := strings.CutSuffix(e.Name(), ".jsonl")
		first, err := strconv.ParseInt(num, 10, 64)
		if !ok || err != nil || first <= 0 || !e.Type().IsRegular() {
			continue
		}
		segs = append(segs, seg{first, filepath.Join(dir, "logs", e.Name())})
	}
	sort.Slice(segs, func(i, j int) bool { return segs[i].first < segs[j].first })
	for _, s := range segs {
		out = append(out, s.path)
	}
	return out, nil
}

// firstSeq is the lowest seq stored in the sources.
func firstSeq(sources []string) (int64, bool, error) {
	lowest, found := int64(0), false
	for _, src := range sources {
		err := eachLine(src, func(e *LogEntry) error {
			if e.Seq > 0 && (!found || e.Seq < lowest) {
				lowest, found = e.Seq, true
			}
			return errStopLines
		})
		if err != nil {
			return 0, false, err
		}
	}
	return lowest, found, nil
}

var errStopLines = errors.New("stop")

// eachLine decodes a StateLog file line by line; lines that do not decode
// (torn by a crash: never acknowledged) are skipped, and so is an
// unterminated last line.
func eachLine(path string, fn func(*LogEntry) error) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 256<<10)
	for {
		line, err := br.ReadBytes('\n')
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		var e LogEntry
		if json.Unmarshal(bytes.TrimSpace(line), &e) != nil || e.Seq <= 0 {
			continue
		}
		if err := fn(&e); errors.Is(err, errStopLines) {
			return nil
		} else if err != nil {
			return err
		}
	}
}

// logImport publishes one app's StateLogs, pipelined: each publish says
// which stream seq must come before it, so they land on their own seqs or
// fail.
type logImport struct {
	st      *natsStore
	app     string
	last    int64 // stream seq of the last message published
	n       int64
	gaps    []uint64
	pending []jetstream.PubAckFuture
	highs   map[streamKey]int64
	lasts   map[streamKey]*LogEntry
}

func (imp *logImport) file(ctx context.Context, path string) error {
	return eachLine(path, func(e *LogEntry) error {
		if e.Seq <= imp.last {
			return nil // imported already, or an out-of-order line
		}
		for imp.last+1 < e.Seq {
			if err := imp.publish(ctx, gapSubject(imp.app), []byte("{}")); err != nil {
				return err
			}
			imp.gaps = append(imp.gaps, uint64(imp.last))
		}
		data, err := encodeEntry(*e)
		if err != nil {
			return err
		}
		if err := imp.publish(ctx, logSubject(imp.app, e.InstanceID, e.LogStream), data); err != nil {
			return err
		}
		imp.n++
		k := streamKey{e.InstanceID, e.LogStream}
		if e.LogStream != "" {
			imp.highs[k] = max(imp.highs[k], e.AgentSeq)
		}
		cp := *e
		imp.lasts[k] = &cp
		return nil
	})
}

func (imp *logImport) publish(ctx context.Context, subject string, data []byte) error {
	m := nats.NewMsg(subject)
	m.Data = data
	m.Header.Set(jetstream.ExpectedLastSeqHeader, strconv.FormatInt(imp.last, 10))
	f, err := imp.st.js.PublishMsgAsync(m)
	if err != nil {
		return err
	}
	imp.last++
	imp.pending = append(imp.pending, f)
	if len(imp.pending) >= 1000 {
		return imp.wait(ctx)
	}
	return nil
}

// wait collects the acknowledgements of what was published.
func (imp *logImport) wait(ctx context.Context) error {
	defer func() { imp.pending = imp.pending[:0] }()
	for _, f := range imp.pending {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			return fmt.Errorf("publishing: %w", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(opTimeout):
			return errors.New("publishing: no acknowledgement within 10 s")
		}
	}
	return nil
}
