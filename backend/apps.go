package backend

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"time"
)

// An app whose record is stored but does not decode (written by hand, or
// by a newer version) is kept as failed, never dropped: dropping it would
// let a PUT create it afresh over what is stored (version back to 1, its
// instances' tokens forgotten). A failed app refuses everything (its API
// calls 503, its agents' Handshakes close 1013 so they come back later,
// which also means none of their StateLogs is taken) and comes back, on
// every replica and without a restart, as soon as a record that decodes is
// stored (the watch delivers it). A write the store cannot make (NATS
// unreachable, no quorum, JetStream out of storage) is refused the same
// way, with nothing changed.

var (
	errNoApp     = errors.New("no such app")
	errAppExists = errors.New("the app is already stored")
)

var appIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

func validAppID(id string) error {
	if !appIDPattern.MatchString(id) {
		return fmt.Errorf("app id %q: use 1-128 letters, digits, '.', '_' or '-'", id)
	}
	return nil
}

// appFailure is why a stored app is refused.
type appFailure struct {
	app string
	err error
}

func (f *appFailure) Error() string {
	return fmt.Sprintf("app %s is stored but cannot be loaded: %v; nothing of it is changed until it loads", f.app, f.err)
}

func (f *appFailure) Unwrap() error { return f.err }

// appFor returns an app of the view: errNoApp when none is stored, an
// *appFailure when its record does not decode.
func (s *Server) appFor(id string) (*appState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.apps[id]
	switch {
	case a == nil:
		return nil, errNoApp
	case a.failed != nil:
		return nil, &appFailure{app: id, err: a.failed}
	case !a.exists:
		return nil, errNoApp
	}
	return a, nil
}

// create stores a new app with a fresh enrollment secret (no instance can
// ever enroll without one). When the app is stored already (another
// replica made it a moment ago, say) that app is read instead: never
// created over.
func (s *Server) create(ctx context.Context, id string) (*appState, error) {
	secret, err := newSecret()
	if err != nil {
		return nil, err
	}
	_, _, err = s.st.createApp(ctx, id, secret)
	if err != nil && !errors.Is(err, errAppExists) {
		return nil, err
	}
	if err := s.refresh(ctx, id); err != nil {
		return nil, err
	}
	return s.appFor(id)
}

// refresh reads an app's record and secret from the store into the view
// (ahead of the watch).
func (s *Server) refresh(ctx context.Context, id string) error {
	cctx, cancel := opCtx(ctx)
	e, err := kvGet(cctx, s.st.apps, esc(id))
	cancel()
	if err != nil {
		return fmt.Errorf("bucket %s: %w", bucketApps, err)
	}
	s.apply(eventOf(bucketApps, e))
	secret, rev, err := s.st.secretOf(ctx, id)
	if err != nil {
		return err
	}
	s.apply(kvEvent{bucket: bucketSecrets, key: esc(id), value: []byte(secret), rev: rev})
	return nil
}

// storageError answers an app that is refused, or a write the store
// refused, with 503 and a Retry-After: both pass once the store is fixed.
func storageError(w http.ResponseWriter, what string, err error) {
	const retry = 5 * time.Second
	w.Header().Set("Retry-After", strconv.Itoa(int(retry/time.Second)))
	var f *appFailure
	if errors.As(err, &f) {
		apiError(w, http.StatusServiceUnavailable, "%v", err)
		return
	}
	apiError(w, http.StatusServiceUnavailable, "%s: %v (the backend's storage, NATS JetStream, refused it; nothing was changed: retry once it is fixed, e.g. the cluster reachable again or storage freed)", what, err)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
