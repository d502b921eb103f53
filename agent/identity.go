package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/metadata"
)

// TokenBytes is the size of a generated instance token (256 bits).
const TokenBytes = 32

// identity resolves who this instance is: its id, its app (from the config,
// refreshed from userdata) and its token.
type identity struct {
	root fsutil.Root
	log  *slog.Logger
	meta *metadata.Client // nil when [network] instance_id is set

	mu         sync.Mutex
	cfg        *config.Config
	instanceID string // cached once known from config or metadata
}

func newIdentity(root fsutil.Root, cfg *config.Config, log *slog.Logger) *identity {
	id := &identity{root: root, cfg: cfg, log: log}
	if cfg.Network.InstanceID == "" {
		id.meta = metadata.New(metadata.Options{BaseURL: cfg.Network.Metadata, Logger: log})
	} else {
		id.instanceID = cfg.Network.InstanceID
	}
	return id
}

// InstanceID returns the instance id: [network] instance_id, else the
// metadata service, else /etc/machine-id (with a warning, not cached, so
// that a metadata service that comes up later is used).
func (id *identity) InstanceID(ctx context.Context) (string, error) {
	id.mu.Lock()
	cached := id.instanceID
	id.mu.Unlock()
	if cached != "" {
		return cached, nil
	}
	mctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	iid, err := id.meta.InstanceID(mctx)
	if err == nil {
		id.mu.Lock()
		id.instanceID = iid
		id.mu.Unlock()
		return iid, nil
	}
	if ctx.Err() != nil {
		return "", ctx.Err()
	}
	data, merr := os.ReadFile(id.root.Path("/etc/machine-id"))
	if mid := strings.TrimSpace(string(data)); merr == nil && mid != "" {
		id.log.Warn("no instance metadata; using /etc/machine-id as the instance id (set [network] instance_id to choose one)", "err", err, "instance_id", mid)
		return mid, nil
	}
	return "", fmt.Errorf("%w; /etc/machine-id: %v", err, merr)
}

// RefreshUserdata reads the instance's userdata and writes values that
// differ from the config back to it. When the app id changes the instance
// token is replaced, as the 2014 agent did: the instance now belongs to
// another app. A missing metadata service or userdata is not an error.
func (id *identity) RefreshUserdata(ctx context.Context) error {
	if id.meta == nil {
		return nil
	}
	mctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	raw, err := id.meta.UserData(mctx)
	if err != nil {
		if errors.Is(err, metadata.ErrNotFound) {
			return nil
		}
		return fmt.Errorf("userdata: %w", err)
	}
	ud := metadata.ParseUserdata(raw)
	id.mu.Lock()
	defer id.mu.Unlock()
	changed := map[string]string{}
	oldApp := id.cfg.Userdata.AppID
	next := *id.cfg
	for _, kv := range []struct{ key, value, current string }{
		{"ws_uri", ud.WSURI, next.Userdata.WSURI},
		{"app_id", ud.AppID, next.Userdata.AppID},
		{"version", ud.Version, next.Userdata.Version},
		{"base_remote", ud.BaseRemote, next.Userdata.BaseRemote},
		{"pubkey", ud.PubKey, next.Userdata.PubKey},
	} {
		if kv.value == "" || kv.value == kv.current {
			continue
		}
		// Set checks the value's form (a ws_uri must be ws:// or wss://).
		if err := next.Set("userdata", kv.key, kv.value); err != nil {
			return fmt.Errorf("userdata values not applied: %w", err)
		}
		changed[kv.key] = kv.value
	}
	if len(changed) == 0 {
		return nil
	}
	if err := next.Validate(); err != nil {
		return fmt.Errorf("userdata values not applied: %w", err)
	}
	*id.cfg = next
	if err := id.cfg.Save(""); err != nil {
		return err
	}
	keys := make([]string, 0, len(changed))
	for k := range changed {
		keys = append(keys, k)
	}
	id.log.Info("config updated from userdata", "keys", strings.Join(keys, ","))
	if _, ok := changed["app_id"]; ok && oldApp != "" {
		if err := id.newToken(); err != nil {
			return err
		}
		id.log.Info("app id changed; instance token replaced", "app_id", id.cfg.Userdata.AppID)
	}
	return nil
}

// AppID returns the configured app id.
func (id *identity) AppID() string {
	id.mu.Lock()
	defer id.mu.Unlock()
	return id.cfg.Userdata.AppID
}

// Token returns the instance token, creating one when the file is missing.
func (id *identity) Token() (string, error) {
	id.mu.Lock()
	defer id.mu.Unlock()
	data, err := os.ReadFile(id.root.Path(id.cfg.Global.Token))
	if err == nil && strings.TrimSpace(string(data)) != "" {
		return strings.TrimSpace(string(data)), nil
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("instance token %s: %w", id.cfg.Global.Token, err)
	}
	if err := id.newToken(); err != nil {
		return "", err
	}
	data, err = os.ReadFile(id.root.Path(id.cfg.Global.Token))
	if err != nil {
		return "", fmt.Errorf("instance token %s: %w", id.cfg.Global.Token, err)
	}
	return strings.TrimSpace(string(data)), nil
}

// newToken writes a fresh random token (mode 0400). Callers hold mu.
func (id *identity) newToken() error {
	buf := make([]byte, TokenBytes)
	if _, err := rand.Read(buf); err != nil {
		return fmt.Errorf("instance token: %w", err)
	}
	p := id.root.Path(id.cfg.Global.Token)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("instance token %s: %w", id.cfg.Global.Token, err)
	}
	if err := fsutil.WriteFileAtomic(p, []byte(hex.EncodeToString(buf)+"\n"), 0o400); err != nil {
		return fmt.Errorf("instance token %s: %w", id.cfg.Global.Token, err)
	}
	return nil
}

// CachedInstanceID returns the instance id if it is already known, without
// asking anything.
func (id *identity) CachedInstanceID() (string, bool) {
	id.mu.Lock()
	defer id.mu.Unlock()
	return id.instanceID, id.instanceID != ""
}

// SetModule writes a recipe's states repository back to the config
// ([module] mod_repo, mod_tag), as the 2014 agent did.
func (id *identity) SetModule(repo, tag string) error {
	id.mu.Lock()
	defer id.mu.Unlock()
	if id.cfg.Module.Repo == repo && id.cfg.Module.Tag == tag {
		return nil
	}
	id.cfg.Module.Repo, id.cfg.Module.Tag = repo, tag
	return id.cfg.Save("")
}
