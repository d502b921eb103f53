package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/metadata"
	"github.com/visualops/opsagent/internal/token"
	"github.com/visualops/opsagent/internal/userdata"
)

// identity resolves who this instance is: its id, its app (from the config,
// refreshed from userdata through the config's Owner) and its token.
type identity struct {
	layout config.Layout
	owner  *config.Owner
	log    *slog.Logger
	meta   *metadata.Client // nil when [network] instance_id is set

	mu         sync.Mutex // guards instanceID and the token file
	instanceID string     // cached once known from config or metadata
}

func newIdentity(layout config.Layout, owner *config.Owner, log *slog.Logger) *identity {
	cur := owner.Current()
	id := &identity{layout: layout, owner: owner, log: log}
	if cur.Network.InstanceID == "" {
		id.meta = metadata.New(metadata.Options{BaseURL: cur.Network.Metadata, Logger: log})
	} else {
		id.instanceID = cur.Network.InstanceID
	}
	return id
}

// InstanceID returns the instance id: [network] instance_id, else the
// metadata service, else /etc/machine-id (with a warning, not cached, so
// that a metadata service that comes up later is used).
func (id *identity) InstanceID(ctx context.Context) (string, error) {
	if cached, ok := id.CachedInstanceID(); ok {
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
	data, merr := fsutil.ReadFixedFile(id.layout.MachineIDFile(), 4<<10)
	if mid := strings.TrimSpace(string(data)); merr == nil && mid != "" {
		id.log.Warn("no instance metadata; using /etc/machine-id as the instance id (set [network] instance_id to choose one)", "err", err, "instance_id", mid)
		return mid, nil
	}
	return "", fmt.Errorf("%w; /etc/machine-id: %v", err, merr)
}

// RefreshUserdata reads the instance's userdata and writes values that
// differ from the config back to it (userdata.Apply's rules: the version
// is never lowered), through the Owner (which hands a new ws_uri to the
// connection). When the app id changes the instance token is replaced
// (userdata.NewToken). A missing metadata service or userdata is not an
// error.
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
	ud := userdata.Parse(raw)
	var changed []string
	oldApp := id.owner.Current().Userdata.AppID
	saved, err := id.owner.Update(func(c *config.Config) error {
		var err error
		if changed, err = userdata.Apply(c, ud); err != nil {
			return err
		}
		if len(changed) == 0 {
			return config.ErrNoChange
		}
		return nil
	})
	if err != nil || !saved {
		return err
	}
	sort.Strings(changed)
	id.log.Info("config updated from userdata", "keys", strings.Join(changed, ","))
	if app := id.owner.Current().Userdata.AppID; userdata.NewToken(oldApp, app) {
		id.mu.Lock()
		defer id.mu.Unlock()
		if err := token.Create(id.layout.TokenFile()); err != nil {
			return err
		}
		id.log.Info("app id changed; instance token replaced", "app_id", app)
	}
	return nil
}

// Token returns the instance token, creating one when the file is missing.
// A token file that others can read is tightened to 0400 (with a warning);
// a directory in its place is an error that says what to do.
func (id *identity) Token() (string, error) {
	id.mu.Lock()
	defer id.mu.Unlock()
	return token.Ensure(id.layout.TokenFile(), func(msg string) { id.log.Warn(msg) })
}

// CachedInstanceID returns the instance id if it is already known, without
// asking anything.
func (id *identity) CachedInstanceID() (string, bool) {
	id.mu.Lock()
	defer id.mu.Unlock()
	return id.instanceID, id.instanceID != ""
}
