package backend

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"net/http"
	"regexp"
	"sync"
	"time"

	"github.com/visualops/opsagent/protocol"
)

// An app's enrollment secret gates the FIRST Handshake of each instance id:
// without it, anyone who knows an app id could enroll a made-up instance and
// receive the app's recipes, or claim a future instance's id before it
// boots. Once an instance is enrolled its own token (trust on first use)
// identifies it, so rotating the secret does not disturb it.

const (
	secretBytes = 32

	maxInstanceID       = 128
	minInstanceToken    = 16
	maxInstanceToken    = 512
	maxEnrollmentSecret = 256
)

var instanceIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]*$`)

func newSecret() (string, error) {
	buf := make([]byte, secretBytes)
	if _, err := rand.Read(buf); err != nil {
		return "", fmt.Errorf("random enrollment secret: %w", err)
	}
	return hex.EncodeToString(buf), nil
}

// enrollmentOK compares in constant time; hashing first also hides the
// secret's length.
func enrollmentOK(given, want string) bool {
	g, w := sha256.Sum256([]byte(given)), sha256.Sum256([]byte(want))
	return want != "" && subtle.ConstantTimeCompare(g[:], w[:]) == 1
}

// checkIdentity returns why a Handshake's identity is unacceptable (a close
// reason, at most 123 bytes), or "".
func checkIdentity(id *protocol.Identity) string {
	switch {
	case id.InstanceID == "" || id.AppID == "" || id.InstanceToken == "":
		return "handshake needs instance_id, app_id and instance_token"
	case len(id.InstanceID) > maxInstanceID || !instanceIDPattern.MatchString(id.InstanceID):
		return "instance_id: use 1-128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
	case validAppID(id.AppID) != nil:
		return "app_id: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
	case len(id.InstanceToken) < minInstanceToken || len(id.InstanceToken) > maxInstanceToken:
		return fmt.Sprintf("instance_token: must be %d to %d bytes, got %d", minInstanceToken, maxInstanceToken, len(id.InstanceToken))
	case len(id.EnrollmentSecret) > maxEnrollmentSecret:
		return fmt.Sprintf("enrollment_secret: at most %d bytes, got %d", maxEnrollmentSecret, len(id.EnrollmentSecret))
	}
	return ""
}

// enrollReason is the close reason for a missing or wrong secret; it tells
// the operator where the agent reads the secret and where to get it.
const enrollReason = "enrollment secret missing or wrong (set [userdata] enroll_secret, from GET /api/apps/<app>/enrollment)"

func (s *Server) getEnrollment(w http.ResponseWriter, r *http.Request) {
	a, ok := s.app(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	secret := a.Secret
	s.mu.Unlock()
	if secret == "" {
		// An app stored without one (see admit) gets one now.
		if err := s.refresh(r.Context(), a.AppID); err != nil {
			storageError(w, "cannot read the enrollment secret", err)
			return
		}
		s.mu.Lock()
		secret = a.Secret
		s.mu.Unlock()
	}
	writeJSON(w, http.StatusOK, map[string]string{"app_id": a.AppID, "enrollment_secret": secret})
}

// rotateEnrollment replaces the secret. Enrolled instances keep working:
// the secret is only checked on an instance id's first Handshake.
func (s *Server) rotateEnrollment(w http.ResponseWriter, r *http.Request) {
	a, ok := s.app(w, r)
	if !ok {
		return
	}
	if err := decodeBody(w, r, &struct{}{}, true); err != nil {
		bodyError(w, err)
		return
	}
	secret, err := newSecret()
	if err != nil {
		apiError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	rev, err := s.st.putSecret(r.Context(), a.AppID, secret)
	if err != nil {
		storageError(w, "cannot store the new secret (the old one stays valid)", err)
		return
	}
	s.apply(kvEvent{bucket: bucketSecrets, key: esc(a.AppID), value: []byte(secret), rev: rev})
	s.log.Info("enrollment secret rotated", "app_id", a.AppID)
	writeJSON(w, http.StatusOK, map[string]string{"app_id": a.AppID, "enrollment_secret": secret})
}

// revokedReason is the close reason for a revoked instance.
const revokedReason = "instance revoked on the backend: it may not connect (an operator can admit it again)"

// Enrollment is bounded per app, that is per enrollment secret: whoever
// holds the secret could otherwise enroll made-up instance ids without end,
// each getting the app's recipes. A token bucket: Limit new instances per
// Window, and a full window's worth at once, so that an autoscaling group
// launching at once is let in (the default, 100 a minute, takes 300
// instances in about 2 minutes: agents retry refused Handshakes with
// backoff of up to a minute), while a leaked secret yields at most that
// many ids, which the instance list shows and revocation removes. Known
// instances are never counted.
const (
	defaultEnrollLimit  = 100
	defaultEnrollWindow = time.Minute
)

type enrollLimiter struct {
	limit  int // new instances per window; <= 0: none
	window time.Duration

	mu      sync.Mutex
	buckets map[string]*enrollBucket // app → its bucket
}

type enrollBucket struct {
	tokens float64
	last   time.Time
}

func newEnrollLimiter(limit int, window time.Duration) *enrollLimiter {
	return &enrollLimiter{limit: limit, window: window, buckets: map[string]*enrollBucket{}}
}

// allow takes one enrollment from app's bucket, or reports that it is
// empty.
func (l *enrollLimiter) allow(app string, now time.Time) bool {
	if l.limit <= 0 {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[app]
	if b == nil {
		b = &enrollBucket{tokens: float64(l.limit), last: now}
		l.buckets[app] = b
	}
	if elapsed := now.Sub(b.last); elapsed > 0 {
		b.tokens = min(float64(l.limit), b.tokens+float64(l.limit)*elapsed.Seconds()/l.window.Seconds())
		b.last = now
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// reason is the close reason of a Handshake over the limit.
func (l *enrollLimiter) reason() string {
	return fmt.Sprintf("too many new instances for this app (over %d per %s); reconnect later", l.limit, l.window)
}

func hashToken(tok string) string {
	sum := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(sum[:])
}

func sameHash(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}
