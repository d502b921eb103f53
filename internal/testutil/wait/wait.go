// Package wait holds the polling helpers tests share: Eventually for "this
// becomes true", Consistently for "this stays true". Both poll a condition
// with a deadline instead of sleeping and hoping, so a slow machine makes
// a test slower, never wrong.
package wait

import (
	"testing"
	"time"
)

// Timeout is how long Eventually waits by default: generous, because it
// only matters when the test is failing.
const Timeout = 30 * time.Second

// Eventually polls cond every few milliseconds until it is true, and fails
// the test naming what was awaited if it is not within Timeout.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	EventuallyWithin(t, Timeout, what, cond)
}

// EventuallyWithin is Eventually with its own deadline.
func EventuallyWithin(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Consistently checks that cond stays true for the whole of d (polling),
// failing the test naming what broke. It is how a test asserts that
// something does NOT happen, e.g. no StateLog while a wait blocks.
func Consistently(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if !cond() {
			t.Fatalf("%s stopped holding", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
