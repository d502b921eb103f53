package backend

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/protocol"
)

// An app's enrollment secret gates the FIRST Handshake of each instance id:
// without it, anyone who knows an app id could enroll a made-up instance and
// receive the app's recipes, or claim a future instance's id before it
// boots. Once an instance is enrolled its own token (trust on first use)
// identifies it, so rotating the secret does not disturb it.

const (
	secretFile  = "enroll.secret"
	secretBytes = 32

	maxInstanceID       = 128
	minInstanceToken    = 16
	maxInstanceToken    = 512
	maxEnrollmentSecret = 256
)

var instanceIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]*$`)

func (s *Server) secretPath(app string) string {
	return filepath.Join(s.store.appDir(app), secretFile)
}

func newSecret() (string, error) {
	buf := make([]byte, secretBytes)
	if _, err := rand.Read(buf); err != nil {
		return "", fmt.Errorf("random enrollment secret: %w", err)
	}
	return hex.EncodeToString(buf), nil
}

// loadSecrets gives every loaded app its secret, creating the missing ones
// (apps stored before secrets existed).
func (s *Server) loadSecrets() error {
	for id := range s.apps {
		secret, created, err := s.loadOrCreateSecret(id)
		if err != nil {
			return fmt.Errorf("backend: app %s: %w", id, err)
		}
		if created {
			s.log.Info("app had no enrollment secret; created one (new instances must present it)", "app_id", id, "file", s.secretPath(id))
		}
		s.secrets[id] = secret
	}
	return nil
}

// loadOrCreateSecret reads <data>/apps/<app>/enroll.secret, or writes a new
// one when it is missing or empty.
func (s *Server) loadOrCreateSecret(app string) (secret string, created bool, err error) {
	path := s.secretPath(app)
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", false, fmt.Errorf("enrollment secret %s: %w (fix its permissions, or delete it to get a new one)", path, err)
	}
	if secret = strings.TrimSpace(string(data)); secret != "" {
		if len(secret) > maxEnrollmentSecret {
			return "", false, fmt.Errorf("enrollment secret %s: longer than %d bytes, which agents cannot send: shorten it or delete the file to get a new one", path, maxEnrollmentSecret)
		}
		return secret, false, nil
	}
	if secret, err = newSecret(); err != nil {
		return "", false, err
	}
	if err := s.writeSecret(app, secret); err != nil {
		return "", false, err
	}
	return secret, true, nil
}

func (s *Server) writeSecret(app, secret string) error {
	if err := os.MkdirAll(s.store.appDir(app), 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	path := s.secretPath(app)
	if err := fsutil.WriteFileAtomic(path, []byte(secret+"\n"), 0o600); err != nil {
		return fmt.Errorf("enrollment secret %s: %w", path, err)
	}
	return nil
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
	secret := s.secrets[a.AppID]
	s.mu.Unlock()
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
	s.mu.Lock()
	err = s.writeSecret(a.AppID, secret)
	if err == nil {
		s.secrets[a.AppID] = secret
	}
	s.mu.Unlock()
	if err != nil {
		apiError(w, http.StatusInternalServerError, "cannot store the new secret (the old one stays valid): %v", err)
		return
	}
	s.log.Info("enrollment secret rotated", "app_id", a.AppID)
	writeJSON(w, http.StatusOK, map[string]string{"app_id": a.AppID, "enrollment_secret": secret})
}
