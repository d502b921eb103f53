package backend

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/visualops/opsagent/internal/fsutil"
)

// The API is a root shell on every instance (a recipe runs commands), so
// it is never open: every call but /api/healthz needs the token, on any
// address, loopback included (a proxy on the same host, or any local user,
// would otherwise reach it). A backend started without one makes its own
// on first start and keeps it in <data>/api-token, as Jupyter and Vault's
// dev mode do; `opsagent backend` prints where it is, never the token.
// Replicas share it through NATS, so that any of them takes it.

const (
	// APITokenFile is the generated token's name in the data directory.
	APITokenFile   = "api-token"
	apiTokenBytes  = 32 // 256 random bits, hex on disk
	minAPIToken    = 16
	maxAPITokenLen = 4 << 10
)

// apiAuth is what the auth middleware checks against: the token's digest
// (comparing digests takes the same time whatever the length or content
// of the presented token) and where the token is, for the 401 message.
type apiAuth struct {
	digest [sha256.Size]byte
	where  string
}

// newAPIAuth takes the configured token, or the one the replicas share in
// NATS (bucket opsagent-meta), kept in <dir>/api-token as well so that the
// operator can read it there. On the very first start it is the token
// already in <dir>/api-token, if any (an upgraded data directory keeps
// its token), else a new one. file is <dir>/api-token when it is used.
func newAPIAuth(ctx context.Context, dir, configured string, st *natsStore) (auth apiAuth, file string, err error) {
	if configured != "" {
		if len(configured) < minAPIToken {
			return auth, "", fmt.Errorf("backend: the API token is %d characters: use at least %d (e.g. `openssl rand -hex 32`), or set none and the backend makes one in %s",
				len(configured), minAPIToken, filepath.Join(dir, APITokenFile))
		}
		return apiAuth{digest: sha256.Sum256([]byte(configured)), where: "the token the backend was started with (--api-token-file or OPSAGENT_API_TOKEN)"}, "", nil
	}
	file = filepath.Join(dir, APITokenFile)
	local, err := readAPIToken(file)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return auth, "", err
	}
	tok, err := sharedAPIToken(ctx, st, local)
	if err != nil {
		return auth, "", err
	}
	switch {
	case local == "":
		if err := writeAPIToken(file, tok); err != nil {
			return auth, "", err
		}
	case local != tok:
		return auth, "", fmt.Errorf("backend: API token %s is not the one the replicas share in NATS (bucket %s): remove the file (the shared token is written there at the next start) or start every replica with the same OPSAGENT_API_TOKEN",
			file, bucketMeta)
	}
	return apiAuth{digest: sha256.Sum256([]byte(tok)), where: file + " on a backend host"}, file, nil
}

// sharedAPIToken reads the token the replicas share, storing candidate (or
// a new token) when there is none yet.
func sharedAPIToken(ctx context.Context, st *natsStore, candidate string) (string, error) {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	e, err := kvGet(ctx, st.meta, metaAPIToken)
	if err == nil {
		return string(e.Value()), nil
	}
	if !errors.Is(err, jetstream.ErrKeyNotFound) {
		return "", fmt.Errorf("backend: the shared API token (bucket %s): %w", bucketMeta, err)
	}
	if candidate == "" {
		buf := make([]byte, apiTokenBytes)
		if _, err := rand.Read(buf); err != nil {
			return "", fmt.Errorf("backend: API token: %w", err)
		}
		candidate = hex.EncodeToString(buf)
	}
	if _, err := st.meta.Create(ctx, metaAPIToken, []byte(candidate)); errors.Is(err, jetstream.ErrKeyExists) {
		return sharedAPIToken(ctx, st, "") // another replica was first
	} else if err != nil {
		return "", fmt.Errorf("backend: the shared API token (bucket %s): %w", bucketMeta, err)
	}
	return candidate, nil
}

// ok reports whether an Authorization header carries the token.
func (a *apiAuth) ok(header string) bool {
	got, ok := strings.CutPrefix(header, "Bearer ")
	d := sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(d[:], a.digest[:]) == 1 && ok && got != ""
}

// writeAPIToken puts tok in path (0600). It is written aside and linked
// into place: the file appears whole or not at all, and link(2) never
// replaces what another start put there (then that one must be tok).
func writeAPIToken(path, tok string) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+APITokenFile+".tmp-*")
	if err != nil {
		return fmt.Errorf("backend: API token %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.WriteString(tok + "\n")
	if err == nil {
		err = tmp.Sync() // CreateTemp made it 0600
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Link(tmp.Name(), path)
	}
	if errors.Is(err, fs.ErrExist) {
		if got, err := readAPIToken(path); err != nil || got != tok {
			return fmt.Errorf("backend: API token %s appeared while this backend started, with another token: remove it and start again", path)
		}
		return nil
	}
	if err == nil {
		err = fsutil.SyncDir(filepath.Dir(path))
	}
	if err != nil {
		return fmt.Errorf("backend: API token %s: %w", path, err)
	}
	return nil
}

// readAPIToken reads an existing token file (fs.ErrNotExist when there is
// none).
func readAPIToken(path string) (string, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	if errors.Is(err, syscall.ELOOP) {
		return "", fmt.Errorf("backend: API token %s is a symlink: remove it (a new token is made at the next start) or put the token in a regular file there", path)
	}
	if err != nil {
		return "", fmt.Errorf("backend: API token %s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("backend: API token %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("backend: API token %s is not a regular file (%s): remove it; a new token is made at the next start", path, st.Mode().Type())
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("backend: API token %s has mode %04o, so other users can read or change it: chmod 600 %s (or remove it for a new one)", path, perm, path)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxAPITokenLen+1))
	if err != nil {
		return "", fmt.Errorf("backend: API token %s: %w", path, err)
	}
	if len(data) > maxAPITokenLen {
		return "", fmt.Errorf("backend: API token %s: more than %d bytes: it is not a token file", path, maxAPITokenLen)
	}
	tok, _, _ := strings.Cut(string(data), "\n")
	if tok = strings.TrimSpace(tok); len(tok) < minAPIToken {
		return "", fmt.Errorf("backend: API token %s holds %d characters, at least %d are needed: remove it (a new token is made at the next start)", path, len(tok), minAPIToken)
	}
	return tok, nil
}

// auth requires the API token.
func (s *Server) auth(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.apiAuth.ok(r.Header.Get("Authorization")) {
			s.refusals.add(refAPIToken, "remote", r.RemoteAddr, "request", clip(r.Method+" "+r.URL.Path))
			w.Header().Set("WWW-Authenticate", `Bearer realm="opsagent"`)
			apiError(w, http.StatusUnauthorized, "missing or wrong API token: send 'Authorization: Bearer <token>' with %s (e.g. export OPSAGENT_API_TOKEN=...; curl -H \"Authorization: Bearer $OPSAGENT_API_TOKEN\")", s.apiAuth.where)
			return
		}
		h.ServeHTTP(w, r)
	})
}
