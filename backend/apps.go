package backend

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// An app the store holds but cannot load (a full disk, an unreadable
// file) is kept as failed, never dropped: dropping it would let a PUT
// create it afresh over its files (version back to 1, its instances'
// tokens forgotten, its StateLogs overwritten). A failed app refuses
// everything (its API calls 503, its agents' Handshakes close 1013 so they
// come back later, which also means none of their StateLogs is taken) and
// is loaded again on the first access after a backoff, so that it comes
// back without a restart once the cause is gone.

// appFailure is why a stored app is not loaded, and when to try again.
type appFailure struct {
	app      string
	err      error
	attempts int
	delay    time.Duration // before the next attempt
	next     time.Time     // no attempt before
}

func (f *appFailure) Error() string {
	return fmt.Sprintf("app %s is stored but cannot be loaded: %v; nothing of it is changed until it loads (the backend tries again on the next request after %s; fix the cause, e.g. free disk space or fix permissions)",
		f.app, f.err, f.delay.Round(time.Second))
}

func (f *appFailure) Unwrap() error { return f.err }

// appFor returns a loaded app: errNoApp when the store has no such app,
// an *appFailure when it has one that does not load (loading it again
// first when the backoff has passed).
func (s *Server) appFor(id string) (*appState, error) {
	s.mu.Lock()
	a, f := s.apps[id], s.failed[id]
	s.mu.Unlock()
	switch {
	case a != nil:
		return a, nil
	case f == nil:
		return nil, errNoApp
	}
	s.loadMu.Lock()
	defer s.loadMu.Unlock()
	s.mu.Lock()
	a, f = s.apps[id], s.failed[id]
	s.mu.Unlock()
	switch {
	case a != nil:
		return a, nil
	case f == nil:
		return nil, errNoApp
	case time.Now().Before(f.next):
		return nil, f
	}
	return s.load(id)
}

// load reads an app from the store and makes it loaded, or failed. Called
// with loadMu held.
func (s *Server) load(id string) (*appState, error) {
	a, err := s.st.LoadApp(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.failed[id]
	switch {
	case err == nil:
		delete(s.failed, id)
		s.apps[id] = a
		if f != nil {
			s.log.Info("app loaded after failing to", "app_id", id, "attempts", f.attempts+1)
		}
		return a, nil
	case errors.Is(err, errNoApp):
		delete(s.failed, id)
		return nil, errNoApp
	}
	if f == nil {
		f = &appFailure{app: id}
		s.failed[id] = f
	}
	f.attempts++
	f.err = err
	f.delay = min(s.opts.loadRetryMax, s.opts.loadRetryMin<<min(f.attempts-1, 20))
	f.next = time.Now().Add(f.delay)
	// One line per attempt; attempts are spaced by the backoff.
	s.log.Error("cannot load an app; it is kept as failed and refuses every change until it loads", "app_id", id, "err", err,
		"attempt", f.attempts, "retry_after", f.delay)
	return nil, f
}

// create stores a new app with a fresh enrollment secret (no instance can
// ever enroll without one) and loads it. When the store already holds the
// app, that app is loaded instead: never created over.
func (s *Server) create(id string) (*appState, error) {
	s.loadMu.Lock()
	defer s.loadMu.Unlock()
	s.mu.Lock()
	a, f := s.apps[id], s.failed[id]
	s.mu.Unlock()
	switch {
	case a != nil:
		return a, nil
	case f != nil:
		return nil, f // refused until a retry (appFor) loads it
	}
	secret, err := newSecret()
	if err != nil {
		return nil, err
	}
	a = newAppState(id, secret)
	err = s.st.CreateApp(a)
	if err == nil {
		s.mu.Lock()
		s.apps[id] = a
		s.mu.Unlock()
		return a, nil
	}
	// Stored already (errAppExists), or created but not loaded (a failed
	// StateLog directory): load what is there. Otherwise nothing was made.
	loaded, lerr := s.load(id)
	if errors.Is(lerr, errNoApp) {
		return nil, err
	}
	return loaded, lerr
}

// storageError answers an app that failed to load, or a write the store
// refused, with 503 and a Retry-After: both come from the backend's disk
// (or its store), and both pass once that is fixed.
func storageError(w http.ResponseWriter, what string, err error) {
	var f *appFailure
	retry := 5 * time.Second
	if errors.As(err, &f) {
		retry = max(time.Until(f.next), time.Second)
		w.Header().Set("Retry-After", strconv.Itoa(int(retry.Round(time.Second)/time.Second)))
		apiError(w, http.StatusServiceUnavailable, "%v", err)
		return
	}
	w.Header().Set("Retry-After", strconv.Itoa(int(retry/time.Second)))
	apiError(w, http.StatusServiceUnavailable, "%s: %v (the backend's storage refused it; nothing was changed: retry once it is fixed, e.g. disk space freed)", what, err)
}
