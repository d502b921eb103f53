package agent

import (
	"context"

	"github.com/visualops/opsagent/agent/rounds"
	"github.com/visualops/opsagent/protocol"
	"github.com/visualops/opsagent/updater"
)

// roundsUpdater hands the round engine's AgentUpdates to the updater,
// which owns every update flow (the request by hand, the status, the
// confirmation): this is the protocol's side of the seam alone.
type roundsUpdater struct{ u *updater.Updater }

// Prepare is rounds.Updater.
func (r roundsUpdater) Prepare(ctx context.Context, au protocol.AgentUpdate) (rounds.Prepared, error) {
	p, err := r.u.PrepareDelivered(ctx, au.Version, au.URL)
	if err != nil {
		return nil, err
	}
	return p, nil
}
