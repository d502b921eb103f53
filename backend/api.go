package backend

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/visualops/opsagent/protocol"
)

// maxBody bounds API request bodies (a recipe is a few hundred KiB at most).
const maxBody = 8 << 20

// route is one API endpoint. Every route needs the API token except the
// public ones, and every PUT/POST needs a JSON Content-Type.
type route struct {
	method, pattern string
	handle          http.HandlerFunc
	public          bool
}

// apiRoutes is the single list of endpoints: routes registers it, the 405
// answers derive from it, and the tests walk it.
func (s *Server) apiRoutes() []route {
	return []route{
		{"GET", "/api/healthz", s.healthz, true},
		{"GET", "/api/apps", s.listApps, false},
		{"PUT", "/api/apps/{app}/recipe", s.putRecipe, false},
		{"GET", "/api/apps/{app}/recipe", s.getRecipe, false},
		{"GET", "/api/apps/{app}/instances", s.listInstances, false},
		{"DELETE", "/api/apps/{app}/instances/{instance}", s.revokeInstance, false},
		{"POST", "/api/apps/{app}/instances/{instance}/admit", s.admitInstance, false},
		{"GET", "/api/apps/{app}/logs", s.getLogs, false},
		{"POST", "/api/apps/{app}/waits", s.postWait, false},
		{"POST", "/api/apps/{app}/update", s.postUpdate, false},
		{"GET", "/api/apps/{app}/enrollment", s.getEnrollment, false},
		{"POST", "/api/apps/{app}/enrollment/rotate", s.rotateEnrollment, false},
	}
}

func (s *Server) routes(mux *http.ServeMux) {
	allow := map[string][]string{}
	for _, rt := range s.apiRoutes() {
		h := http.Handler(rt.handle)
		if rt.method == http.MethodPut || rt.method == http.MethodPost {
			h = requireJSON(h)
		}
		if !rt.public {
			h = s.auth(h)
		}
		mux.Handle(rt.method+" "+rt.pattern, h)
		allow[rt.pattern] = append(allow[rt.pattern], rt.method)
	}
	for path, methods := range allow {
		allowed := strings.Join(methods, ", ")
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allowed)
			apiError(w, http.StatusMethodNotAllowed, "%s %s: method not allowed (use %s)", r.Method, r.URL.Path, allowed)
		})
	}
	mux.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		apiError(w, http.StatusNotFound, "no such endpoint: %s %s", r.Method, r.URL.Path)
	})
}

func (s *Server) healthz(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"ok": true})
}

// requireJSON refuses bodies not declared as JSON. Besides catching
// mistakes, it stops plain HTML forms: a browser sends application/json
// cross-site only after a CORS preflight, which this backend never grants.
func requireJSON(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ct := r.Header.Get("Content-Type")
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			apiError(w, http.StatusUnsupportedMediaType, "Content-Type %q: send 'Content-Type: application/json' with a JSON object body", ct)
			return
		}
		h.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func apiError(w http.ResponseWriter, code int, format string, a ...any) {
	writeJSON(w, code, map[string]string{"error": fmt.Sprintf(format, a...)})
}

// decodeBody reads exactly one JSON object (unknown fields refused, at
// most maxBody bytes, nothing after it). emptyOK accepts an empty body as
// an empty object.
func decodeBody(w http.ResponseWriter, r *http.Request, v any, emptyOK bool) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if emptyOK && errors.Is(err, io.EOF) {
			return nil
		}
		return bodyProblem(err)
	}
	// A second value, or garbage, after the object would be silently
	// dropped: refuse it so that a mangled body is noticed.
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return err
		}
		return errors.New("trailing data after the JSON object: send exactly one object")
	}
	return nil
}

func bodyProblem(err error) error {
	var te *json.UnmarshalTypeError
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		return err
	case errors.Is(err, io.EOF):
		return errors.New("empty body: send a JSON object")
	case errors.As(err, &te) && te.Field == "":
		return fmt.Errorf("body must be a JSON object, not a JSON %s", te.Value)
	case errors.As(err, &te):
		return fmt.Errorf("field %s: must be a JSON %s, not %s", te.Field, jsonType(te.Type.Kind().String()), te.Value)
	}
	return fmt.Errorf("body is not the expected JSON object: %v", err)
}

// bodyError answers a decodeBody error: 413 when over the size cap, 400
// otherwise.
func bodyError(w http.ResponseWriter, err error) {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		apiError(w, http.StatusRequestEntityTooLarge, "body over %d bytes: send a smaller recipe", mbe.Limit)
		return
	}
	apiError(w, http.StatusBadRequest, "%v", err)
}

// app is the app a route names: 404 when there is none, 503 when it is
// stored but refused.
func (s *Server) app(w http.ResponseWriter, r *http.Request) (*appState, bool) {
	id := r.PathValue("app")
	a, err := s.appFor(id)
	switch {
	case errors.Is(err, errNoApp):
		apiError(w, http.StatusNotFound, "app %q does not exist: create it with PUT /api/apps/%s/recipe", id, id)
		return nil, false
	case err != nil:
		storageError(w, "app "+id, err)
		return nil, false
	}
	return a, true
}

// listApps lists the apps, and those whose record does not decode with
// why. connected counts instances connected to any replica.
func (s *Server) listApps(w http.ResponseWriter, r *http.Request) {
	type row struct {
		id      string
		version int64
		n       int
		failed  error
	}
	var rows []row
	s.mu.Lock()
	for _, id := range sortedKeys(s.apps) {
		a := s.apps[id]
		switch {
		case a.failed != nil:
			rows = append(rows, row{id: id, failed: &appFailure{app: id, err: a.failed}})
		case a.exists:
			rows = append(rows, row{id: id, version: a.RecipeVersion, n: s.connectedCount(a)})
		}
	}
	s.mu.Unlock()
	out := []map[string]any{}
	for _, rw := range rows {
		if rw.failed != nil {
			out = append(out, map[string]any{"app_id": rw.id, "failed": rw.failed.Error()})
			continue
		}
		seq, err := s.st.lastSeq(r.Context(), rw.id)
		m := map[string]any{"app_id": rw.id, "recipe_version": rw.version, "connected": rw.n, "log_seq": seq}
		if err != nil {
			m["log_error"] = err.Error()
		}
		out = append(out, m)
	}
	writeJSON(w, http.StatusOK, map[string]any{"apps": out})
}

// recipeBody is PUT /api/apps/{app}/recipe.
type recipeBody struct {
	Module *protocol.ModuleSource `json:"module"`
	State  *[]json.RawMessage     `json:"state"`
}

func (s *Server) putRecipe(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("app")
	if err := validAppID(id); err != nil {
		apiError(w, http.StatusBadRequest, "%v", err)
		return
	}
	var body recipeBody
	if err := decodeBody(w, r, &body, false); err != nil {
		bodyError(w, err)
		return
	}
	if body.State == nil {
		apiError(w, http.StatusBadRequest, "field state: missing (a list of {\"id\", \"module\", \"parameter\"})")
		return
	}
	// Validate exactly as an agent would, by decoding the frame we would send.
	probe := map[string]any{"code": protocol.CodeRecipeMetadata, "recipe_version": 1, "state": body.State}
	if body.Module != nil {
		probe["module"] = body.Module
	}
	raw, _ := json.Marshal(probe)
	msg, err := protocol.Decode(raw)
	if err == nil {
		err = protocol.ValidateRecipe(msg.(*protocol.RecipeMetadata))
	}
	if err != nil {
		var pe *protocol.Error
		if errors.As(err, &pe) && pe.Field != "" {
			apiError(w, http.StatusBadRequest, "field %s: %s", pe.Field, pe.Problem)
			return
		}
		apiError(w, http.StatusBadRequest, "%v", err)
		return
	}
	rec := msg.(*protocol.RecipeMetadata)

	_, err = s.appFor(id)
	if errors.Is(err, errNoApp) {
		_, err = s.create(r.Context(), id)
	}
	if err != nil {
		storageError(w, "cannot store the recipe", err)
		return
	}
	states := make([]stateJSON, len(rec.States))
	for i, st := range rec.States {
		states[i] = stateJSON{ID: st.ID, Module: st.Module, Parameter: st.Parameter}
	}
	// One compare-and-set: two PUTs on two replicas make two versions.
	stored, rev, err := s.st.updateApp(r.Context(), id, func(a *appRecord) error {
		a.RecipeVersion++
		a.Module, a.States = rec.Module, states
		return nil
	})
	if err != nil {
		storageError(w, "cannot store the recipe", err)
		return
	}
	data, _ := json.Marshal(stored)
	s.apply(kvEvent{bucket: bucketApps, key: esc(id), value: data, rev: rev})
	s.mu.Lock()
	n := s.connectedCount(s.view(id))
	s.mu.Unlock()
	s.log.Info("recipe stored; pushed by every replica to its agents", "app_id", id, "recipe_version", stored.RecipeVersion, "states", len(rec.States), "connected", n)
	writeJSON(w, http.StatusOK, map[string]any{"app_id": id, "recipe_version": stored.RecipeVersion, "pushed_to": n})
}

func (s *Server) getRecipe(w http.ResponseWriter, r *http.Request) {
	a, ok := s.app(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	body := map[string]any{"app_id": a.AppID, "recipe_version": a.RecipeVersion, "module": a.Module, "state": a.States}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, body)
}

// Instance is one row of GET /api/apps/{app}/instances. The StateLog
// fields come from the log stream summaries, never from the logs.
type Instance struct {
	InstanceID string `json:"instance_id"`
	Connected  bool   `json:"connected"`
	// Replica names the backend replica holding the connection.
	Replica string `json:"replica,omitempty"`
	// RevokedAt is set for a revoked instance: it may not connect until
	// admitted again (DELETE …/instances/{id}, POST …/{id}/admit).
	RevokedAt      *time.Time `json:"revoked_at,omitempty"`
	AgentVersion   string     `json:"agent_version,omitempty"`
	ConnectedSince *time.Time `json:"connected_since,omitempty"`
	// RecipeVersion is the last recipe version pushed to it (through
	// another replica: the app's current one, which every replica pushes).
	RecipeVersion int64 `json:"recipe_version,omitempty"`
	// InitErrors is what a connected agent's Handshake reported (a failed
	// Salt path, a rolled-back update, …).
	InitErrors   string    `json:"init_errors,omitempty"`
	LastStateLog *LogEntry `json:"last_state_log,omitempty"`
	// StateLogs is how many of its StateLogs are retained.
	StateLogs      int64      `json:"state_logs"`
	LastReceivedAt *time.Time `json:"last_received_at,omitempty"`
	// LogStreams maps each protocol-2 log stream to the highest seq stored.
	LogStreams map[string]int64 `json:"log_streams,omitempty"`
}

func (s *Server) listInstances(w http.ResponseWriter, r *http.Request) {
	a, ok := s.app(w, r)
	if !ok {
		return
	}
	sums, err := s.st.summaries(r.Context(), a.AppID)
	if err != nil {
		storageError(w, "cannot read the StateLog summaries", err)
		return
	}
	s.mu.Lock()
	out := []Instance{}
	ids := sortedKeys(a.TokenHashes)
	for _, id := range sortedKeys(a.Revoked) {
		if _, ok := a.TokenHashes[id]; !ok {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	for _, id := range ids {
		in := Instance{InstanceID: id}
		if at, ok := a.Revoked[id]; ok {
			in.RevokedAt = &at
		}
		in.addSummary(sums[id])
		if c, p, ok := s.connectedAt(a, id); ok {
			since := p.Since
			in.Connected, in.Replica, in.AgentVersion, in.ConnectedSince, in.InitErrors = true, p.Replica, p.AgentVersion, &since, p.InitErrors
			in.RecipeVersion = a.RecipeVersion
			if c != nil {
				in.RecipeVersion = c.recipeVersion.Load()
			}
		}
		out = append(out, in)
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"instances": out})
}

func (in *Instance) addSummary(sum instSummary) {
	in.LastStateLog, in.StateLogs = sum.last, sum.count
	if !sum.lastRecv.IsZero() {
		t := sum.lastRecv
		in.LastReceivedAt = &t
	}
	if len(sum.streams) > 0 {
		in.LogStreams = sum.streams
	}
}

// getLogs serves one page of an app's StateLogs, oldest first:
// {"logs": [...], "next": N, "more": bool}. A page holds the StateLogs with
// seq > after (default 0), at most limit of them (default 1000, at most
// 10000) and at most maxPageBytes (4 MiB) of them as stored, but always at
// least one when there is one, however large: a page is built in memory,
// and the byte bound keeps a page of fat StateLogs (64 KiB comment and
// stdout each) from costing hundreds of MiB. next is the cursor for the
// following page (?after=next; after when the page is empty). more is true
// when the page ended before the last stored StateLog (cut by limit or by
// size): ask again at once. When it is false the client has caught up;
// StateLogs stored later come with the same cursor. Seqs are the app's
// StateLog stream seqs: they grow, with gaps.
func (s *Server) getLogs(w http.ResponseWriter, r *http.Request) {
	if _, ok := s.app(w, r); !ok {
		return
	}
	after, limit := int64(0), 1000
	if v := r.URL.Query().Get("after"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			apiError(w, http.StatusBadRequest, "query after=%q: must be a non-negative integer (the next cursor of the previous page)", v)
			return
		}
		after = n
	}
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 10000 {
			apiError(w, http.StatusBadRequest, "query limit=%q: must be an integer from 1 to 10000", v)
			return
		}
		limit = n
	}
	logs, more, err := s.st.readLogs(r.Context(), r.PathValue("app"), after, limit, maxPageBytes)
	if err != nil {
		storageError(w, "cannot read the logs", err)
		return
	}
	next := after
	if len(logs) > 0 {
		next = logs[len(logs)-1].Seq
	}
	writeJSON(w, http.StatusOK, map[string]any{"logs": logs, "next": next, "more": more})
}

// postWait releases a wait for one instance: stored, then pushed by
// whichever replica holds the instance. pushed reports that the instance
// is connected (to any replica).
func (s *Server) postWait(w http.ResponseWriter, r *http.Request) {
	a, ok := s.app(w, r)
	if !ok {
		return
	}
	var body struct {
		InstanceID *string `json:"instance_id"`
		StateID    *string `json:"state_id"`
	}
	if err := decodeBody(w, r, &body, false); err != nil {
		bodyError(w, err)
		return
	}
	if body.InstanceID == nil || *body.InstanceID == "" {
		apiError(w, http.StatusBadRequest, "field instance_id: missing or empty")
		return
	}
	if body.StateID == nil || *body.StateID == "" {
		apiError(w, http.StatusBadRequest, "field state_id: missing or empty")
		return
	}
	inst, state := *body.InstanceID, *body.StateID
	if inst == allInstances {
		apiError(w, http.StatusBadRequest, "field instance_id: %q is not an instance id", inst)
		return
	}
	s.mu.Lock()
	version, already := a.RecipeVersion, a.released(inst, state)
	s.mu.Unlock()
	if !already {
		rev, err := s.st.releaseWait(r.Context(), a.AppID, version, inst, state)
		if err != nil {
			storageError(w, "cannot store the wait", err)
			return
		}
		data, _ := json.Marshal(waitRecord{RecipeVersion: version})
		s.apply(kvEvent{bucket: bucketWaits, key: waitKey(a.AppID, inst, state), value: data, rev: rev})
	}
	s.mu.Lock()
	_, _, connected := s.connectedAt(a, inst)
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"recipe_version": version, "pushed": connected})
}

func (s *Server) postUpdate(w http.ResponseWriter, r *http.Request) {
	a, ok := s.app(w, r)
	if !ok {
		return
	}
	var body struct {
		Version *string `json:"version"`
		URL     string  `json:"url"`
	}
	if err := decodeBody(w, r, &body, false); err != nil {
		bodyError(w, err)
		return
	}
	if body.Version == nil || strings.TrimSpace(*body.Version) == "" {
		apiError(w, http.StatusBadRequest, "field version: missing or empty (e.g. \"2.2\")")
		return
	}
	if body.URL != "" && !strings.HasPrefix(body.URL, "https://") && !strings.HasPrefix(body.URL, "http://") {
		apiError(w, http.StatusBadRequest, "field url: must be an http(s) URL of opsagent.tgz, or empty for <base_remote>/<version>/opsagent.tgz")
		return
	}
	u := &protocol.AgentUpdate{Version: *body.Version, URL: body.URL}
	stored, rev, err := s.st.updateApp(r.Context(), a.AppID, func(rec *appRecord) error {
		rec.Update = u
		return nil
	})
	if err != nil {
		storageError(w, "cannot store the update", err)
		return
	}
	data, _ := json.Marshal(stored)
	s.apply(kvEvent{bucket: bucketApps, key: esc(a.AppID), value: data, rev: rev})
	n := 0
	s.mu.Lock()
	for _, id := range sortedKeys(a.TokenHashes) {
		if _, p, ok := s.connectedAt(a, id); ok && p.AgentVersion != u.Version {
			n++
		}
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"version": u.Version, "pushed_to": n})
}

func jsonType(goKind string) string {
	switch goKind {
	case "string":
		return "string"
	case "slice", "array":
		return "list"
	case "struct", "map", "ptr":
		return "object"
	case "bool":
		return "boolean"
	}
	return "number"
}

// revokeInstance forgets an instance's token and bars its id: it cannot
// connect, nor enroll again with the enrollment secret (which it may well
// hold), until admitted. Its connection, on whichever replica, is closed.
// The revocation is stored before the answer.
func (s *Server) revokeInstance(w http.ResponseWriter, r *http.Request) {
	a, ok := s.app(w, r)
	if !ok {
		return
	}
	id := r.PathValue("instance")
	now := time.Now().UTC()
	s.mu.Lock()
	_, enrolled := a.TokenHashes[id]
	at, already := a.Revoked[id]
	_, _, connected := s.connectedAt(a, id)
	s.mu.Unlock()
	if !enrolled && !already {
		apiError(w, http.StatusNotFound, "instance %q is not enrolled in app %s (GET /api/apps/%s/instances lists them)", clip(id), a.AppID, a.AppID)
		return
	}
	if !already {
		rev, err := s.st.revoke(r.Context(), a.AppID, id, now)
		if err != nil {
			storageError(w, "cannot store the revocation (the instance is not revoked)", err)
			return
		}
		data, _ := json.Marshal(instanceRecord{RevokedAt: &now})
		s.apply(kvEvent{bucket: bucketInstances, key: instanceKey(a.AppID, id), value: data, rev: rev})
		at = now
		s.log.Info("instance revoked", "app_id", a.AppID, "instance_id", id, "was_connected", connected)
	}
	// disconnected says whether this call cut a connection: a DELETE of
	// an instance already revoked cuts none, even while the connection
	// the first one closed is still being taken down.
	writeJSON(w, http.StatusOK, map[string]any{"app_id": a.AppID, "instance_id": id, "revoked_at": at, "disconnected": connected && !already})
}

// admitInstance lifts a revocation: the instance id may enroll again, with
// the enrollment secret and a token of its own (the old one is forgotten).
func (s *Server) admitInstance(w http.ResponseWriter, r *http.Request) {
	a, ok := s.app(w, r)
	if !ok {
		return
	}
	if err := decodeBody(w, r, &struct{}{}, true); err != nil {
		bodyError(w, err)
		return
	}
	id := r.PathValue("instance")
	s.mu.Lock()
	_, revoked := a.Revoked[id]
	s.mu.Unlock()
	if !revoked {
		apiError(w, http.StatusNotFound, "instance %q is not revoked in app %s", clip(id), a.AppID)
		return
	}
	if err := s.st.admit(r.Context(), a.AppID, id); err != nil {
		storageError(w, "cannot store the admission (the instance stays revoked)", err)
		return
	}
	s.apply(kvEvent{bucket: bucketInstances, key: instanceKey(a.AppID, id), deleted: true})
	s.log.Info("revoked instance admitted again; it enrolls anew with the enrollment secret", "app_id", a.AppID, "instance_id", id)
	writeJSON(w, http.StatusOK, map[string]any{"app_id": a.AppID, "instance_id": id, "admitted": true})
}
