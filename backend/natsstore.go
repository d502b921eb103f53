package backend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/visualops/opsagent/protocol"
)

// natsStore is where the backend keeps what must outlive it and what its
// replicas share: NATS JetStream, either the embedded single-node server
// (without --nats) or an existing cluster. Both are reached through the
// same client connection and used the same way; see natsnames.go for the
// layout. Every write is acknowledged by JetStream (with the configured
// replication) before the backend answers or acknowledges anything.
type natsStore struct {
	log      *slog.Logger
	replicas int
	logCfg   logConfig
	embedded *server.Server // nil with --nats

	nc *nats.Conn
	js jetstream.JetStream

	apps, secrets, instances, waits, relay, logstreams, presence, replicaKV, meta jetstream.KeyValue
	sums                                                                          *summaryWriter

	// errLog spaces the lines about writes that failed: on a full store
	// every agent's resend would log one.
	errMu  sync.Mutex
	errLog logLimiter

	mu         sync.Mutex
	logStreams map[string]jetstream.Stream // app → its StateLog stream, once known
	batchSlots map[string]chan struct{}    // app → atomic batches this replica may have in flight
}

// logConfig is how StateLog streams are made.
type logConfig struct {
	retentionBytes int64
	retentionAge   time.Duration
	maxOutput      int
}

// NATSOptions says which NATS to use. Without URLs the backend runs an
// embedded single-node NATS server with JetStream in <data>/nats, reached
// only in-process (it listens on no port).
type NATSOptions struct {
	URLs []string
	// Creds is a NATS credentials file (JWT and NKey seed).
	Creds string
	// TLSCA is a PEM file of CAs to trust for the servers; TLSCert and
	// TLSKey a client certificate for servers that require one.
	TLSCA, TLSCert, TLSKey string
	// Replicas is the replica count of every stream and bucket the backend
	// creates (default 1; 3 on a three-node cluster survives a node).
	Replicas int

	// maxStore caps the embedded server's JetStream storage (tests: a full
	// disk as JetStream sees it). 0: JetStream's default.
	maxStore int64
}

const (
	opTimeout = 10 * time.Second
	// replicaTTL is how long a replica's heartbeat keeps it alive; it
	// beats every replicaTTL/3.
	replicaTTL = 15 * time.Second
	// embeddedSync is how often the embedded server fsyncs (JetStream's
	// default is 2 minutes): a kill -9 loses nothing acknowledged (the page
	// cache holds it), a power loss at most this much.
	embeddedSync = time.Second
)

// openNATS starts the embedded server or connects to the cluster, and
// makes the buckets. A cluster still electing its leaders is waited for.
func openNATS(ctx context.Context, dataDir string, o NATSOptions, lc logConfig, log *slog.Logger) (*natsStore, error) {
	st := &natsStore{log: log, replicas: max(o.Replicas, 1), logCfg: lc, errLog: logLimiter{every: 10 * time.Second},
		logStreams: map[string]jetstream.Stream{}, batchSlots: map[string]chan struct{}{}}
	handlers := []nats.Option{
		nats.MaxReconnects(-1), nats.ReconnectWait(500 * time.Millisecond),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("lost the NATS connection; reconnecting (writes are refused meanwhile)", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("NATS connection back", "server", nc.ConnectedUrlRedacted()) }),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { log.Warn("NATS", "err", err) }),
	}
	var err error
	if len(o.URLs) == 0 {
		if st.embedded, err = startEmbedded(filepath.Join(dataDir, "nats"), o.maxStore, log); err != nil {
			return nil, err
		}
		st.nc, err = nats.Connect("", append(handlers, nats.Name("opsagent backend"), nats.InProcessServer(st.embedded))...)
	} else {
		opts := append(handlers, nats.Name("opsagent backend"))
		if o.Creds != "" {
			opts = append(opts, nats.UserCredentials(o.Creds))
		}
		if o.TLSCA != "" {
			opts = append(opts, nats.RootCAs(o.TLSCA))
		}
		if o.TLSCert != "" || o.TLSKey != "" {
			opts = append(opts, nats.ClientCert(o.TLSCert, o.TLSKey))
		}
		st.nc, err = nats.Connect(strings.Join(o.URLs, ","), opts...)
		if err != nil {
			err = fmt.Errorf("cannot connect to NATS at %s: %w (is the cluster up, and are --nats-creds and --nats-tls-* right?)", strings.Join(o.URLs, ","), err)
		}
	}
	if err != nil {
		st.shutdownEmbedded()
		return nil, err
	}
	st.js, err = jetstream.New(st.nc, jetstream.WithPublishAsyncErrHandler(func(_ jetstream.JetStream, m *nats.Msg, err error) {
		log.Error("a protocol-1 StateLog was not stored (protocol-1 agents are never acknowledged, so it is lost)", "subject", m.Subject, "err", err)
	}))
	if err == nil {
		err = st.makeBuckets(ctx)
	}
	if err != nil {
		st.nc.Close()
		st.shutdownEmbedded()
		return nil, err
	}
	st.sums = newSummaryWriter(st)
	return st, nil
}

// startEmbedded runs the single-node server on dir, in this process only.
func startEmbedded(dir string, maxStore int64, log *slog.Logger) (*server.Server, error) {
	ns, err := server.NewServer(&server.Options{
		ServerName: "opsagent-backend", DontListen: true, NoSigs: true,
		JetStream: true, StoreDir: dir, SyncInterval: embeddedSync, JetStreamMaxStore: maxStore,
		// Room for a StateLog of MaxOutputBytes in comment and stdout.
		MaxPayload: 8 << 20,
	})
	if err != nil {
		return nil, fmt.Errorf("embedded NATS server: %w", err)
	}
	ns.SetLoggerV2(natsLogger{log}, false, false, false)
	go ns.Start()
	if !ns.ReadyForConnections(time.Minute) {
		ns.Shutdown()
		return nil, fmt.Errorf("the embedded NATS server on %s did not start within a minute (see the log above)", dir)
	}
	return ns, nil
}

func (st *natsStore) shutdownEmbedded() {
	if st.embedded != nil {
		st.embedded.Shutdown()
		st.embedded.WaitForShutdown()
	}
}

// natsLogger hands the embedded server's log to slog: its notices (a
// banner at start) at debug level, its warnings and errors as such.
type natsLogger struct{ log *slog.Logger }

func (l natsLogger) Noticef(f string, v ...any) { l.log.Debug("nats: " + fmt.Sprintf(f, v...)) }
func (l natsLogger) Warnf(f string, v ...any)   { l.log.Warn("nats: " + fmt.Sprintf(f, v...)) }
func (l natsLogger) Fatalf(f string, v ...any)  { l.log.Error("nats: " + fmt.Sprintf(f, v...)) }
func (l natsLogger) Errorf(f string, v ...any)  { l.log.Error("nats: " + fmt.Sprintf(f, v...)) }
func (l natsLogger) Debugf(f string, v ...any)  { l.log.Debug("nats: " + fmt.Sprintf(f, v...)) }
func (l natsLogger) Tracef(f string, v ...any)  { l.log.Debug("nats: " + fmt.Sprintf(f, v...)) }

// makeBuckets creates (or updates to this replica count) every bucket,
// retrying while the cluster elects its JetStream leader.
func (st *natsStore) makeBuckets(ctx context.Context) error {
	buckets := []struct {
		kv   *jetstream.KeyValue
		name string
		ttl  time.Duration
	}{
		{&st.apps, bucketApps, 0}, {&st.secrets, bucketSecrets, 0}, {&st.instances, bucketInstances, 0},
		{&st.waits, bucketWaits, 0}, {&st.relay, bucketRelay, 0}, {&st.logstreams, bucketLogStreams, 0},
		{&st.presence, bucketPresence, 0}, {&st.replicaKV, bucketReplicas, replicaTTL}, {&st.meta, bucketMeta, 0},
	}
	deadline := time.Now().Add(time.Minute)
	for _, b := range buckets {
		for {
			// Short attempts: a cluster that has just formed answers once
			// its leader is elected, not to a request sent before.
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			kv, err := st.js.CreateOrUpdateKeyValue(cctx, jetstream.KeyValueConfig{Bucket: b.name, History: 1, TTL: b.ttl,
				Storage: jetstream.FileStorage, Replicas: st.replicas})
			cancel()
			if err == nil {
				kv, err = st.leaderReads(ctx, kv)
			}
			if err == nil {
				*b.kv = kv
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				return fmt.Errorf("NATS JetStream: cannot make bucket %s with %d replicas: %w (a cluster needs at least that many JetStream servers; check --nats-replicas)", b.name, st.replicas, err)
			}
			st.log.Info("NATS JetStream not ready yet; retrying", "bucket", b.name, "err", err)
			time.Sleep(500 * time.Millisecond)
		}
	}
	return nil
}

// leaderReads makes a bucket's reads go to its stream's leader. A KV
// bucket serves Gets from any of its replicas by default (direct gets),
// and a follower may not have the last write yet: a replica that just
// created an app would not find it, and every compare-and-set would start
// from a stale revision.
func (st *natsStore) leaderReads(ctx context.Context, kv jetstream.KeyValue) (jetstream.KeyValue, error) {
	name := "KV_" + kv.Bucket()
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	s, err := st.js.Stream(cctx, name)
	if err != nil {
		return nil, err
	}
	if cfg := s.CachedInfo().Config; cfg.AllowDirect {
		cfg.AllowDirect = false
		if _, err := st.js.UpdateStream(cctx, cfg); err != nil {
			return nil, err
		}
	}
	return st.js.KeyValue(cctx, kv.Bucket()) // bound again: it reads the setting when bound
}

// close flushes the stream summaries and closes the connection (and stops
// the embedded server).
func (st *natsStore) close() error {
	err := st.sums.close()
	if derr := st.nc.Drain(); derr != nil && !errors.Is(derr, nats.ErrConnectionClosed) {
		err = errors.Join(err, derr)
	}
	for deadline := time.Now().Add(5 * time.Second); !st.nc.IsClosed() && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	st.nc.Close()
	st.shutdownEmbedded()
	return err
}

// opCtx bounds one store operation.
func opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	if ctx == nil {
		ctx = context.Background()
	}
	return context.WithTimeout(ctx, opTimeout)
}

// errCodeNoPeers is JetStream's "no suitable peers for placement" (the
// server's JSClusterNoPeersErrF; the client names no constant for it).
const errCodeNoPeers jetstream.ErrorCode = 10005

// transient reports an error that a cluster gives while it elects a
// leader, or while a node it was talking to goes away. A placement refused
// for "peer offline" is one too: the meta leader places a stream only on
// peers whose statistics it has heard, and forgets them each time a route
// to the peer is made again, which a cluster just formed does several
// times in its first seconds (heard again within a few seconds).
func transient(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return errors.Is(err, nats.ErrNoResponders) || errors.Is(err, nats.ErrTimeout) || errors.Is(err, jetstream.ErrNoStreamResponse)
	}
	return apiErr.Code == 503 && apiErr.ErrorCode != jetstream.JSErrCodeJetStreamNotEnabled ||
		apiErr.ErrorCode == errCodeNoPeers && strings.Contains(apiErr.Description, "peer offline")
}

// retrying runs a read (or a write that may be made twice) again while it
// fails transiently, within ctx. StateLogs are never published through it:
// a publish that timed out may have been stored.
func retrying(ctx context.Context, fn func(ctx context.Context) error) error {
	for delay := 50 * time.Millisecond; ; delay = min(2*delay, time.Second) {
		err := fn(ctx)
		if err == nil || !transient(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(delay):
		}
	}
}

// kvGet reads a key, again while the cluster answers transiently: a
// bucket whose leader is being elected, or whose leader's interest has not
// reached the node this replica talks to yet ("no responders", seen on a
// cluster just formed). A read is safe to repeat; writes are retried by
// the client, on no responders only.
func kvGet(ctx context.Context, kv jetstream.KeyValue, key string) (e jetstream.KeyValueEntry, err error) {
	err = retrying(ctx, func(ctx context.Context) (err error) { e, err = kv.Get(ctx, key); return err })
	return e, err
}

// isWrongLast reports a failed optimistic-concurrency check: a KV revision
// or a fence that moved (10071), or a concurrent write to the same subject
// on a replicated stream (10164).
func isWrongLast(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) ||
		errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// appRecord is one app as stored (bucket opsagent-apps): its recipe with
// its version and the update offered to its agents.
type appRecord struct {
	AppID         string                 `json:"app_id"`
	RecipeVersion int64                  `json:"recipe_version"`
	Module        *protocol.ModuleSource `json:"module,omitempty"`
	States        []stateJSON            `json:"state"`
	Update        *protocol.AgentUpdate  `json:"update,omitempty"`
	// Imported is the id of the data directory import that made it.
	Imported string `json:"imported,omitempty"`
}

// instanceRecord is one instance (bucket opsagent-instances): the SHA-256
// of its token, trusted on first use, or when it was revoked.
type instanceRecord struct {
	SHA256    string     `json:"sha256,omitempty"`
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
}

func decodeApp(id string, data []byte) (appRecord, error) {
	var r appRecord
	if err := json.Unmarshal(data, &r); err != nil {
		return r, fmt.Errorf("its record in bucket %s does not decode: %w (put a valid one back, e.g. from a backup)", bucketApps, err)
	}
	if r.AppID != id {
		return r, fmt.Errorf("its record in bucket %s names app %q: put the right one back", bucketApps, r.AppID)
	}
	return r, nil
}

// createApp stores a new app: its StateLog stream, its secret (kept when
// one is stored already) and its record. errAppExists when the record is
// there: an app is never created over.
func (st *natsStore) createApp(ctx context.Context, id, secret string) (appRecord, uint64, error) {
	rec := appRecord{AppID: id, States: []stateJSON{}}
	ctx, cancel := opCtx(ctx)
	defer cancel()
	if _, err := kvGet(ctx, st.apps, esc(id)); err == nil {
		return rec, 0, errAppExists
	} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
		return rec, 0, fmt.Errorf("bucket %s: %w", bucketApps, err)
	}
	if err := st.ensureLogStream(ctx, id, 0); err != nil {
		return rec, 0, err
	}
	if _, err := st.secrets.Create(ctx, esc(id), []byte(secret)); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
		return rec, 0, fmt.Errorf("bucket %s: %w", bucketSecrets, err)
	}
	data, _ := json.Marshal(rec)
	rev, err := st.apps.Create(ctx, esc(id), data)
	if errors.Is(err, jetstream.ErrKeyExists) {
		return rec, 0, errAppExists
	}
	if err != nil {
		return rec, 0, fmt.Errorf("bucket %s: %w", bucketApps, err)
	}
	return rec, rev, nil
}

// getApp reads an app's record: errNoApp when there is none.
func (st *natsStore) getApp(ctx context.Context, id string) (appRecord, uint64, error) {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	e, err := kvGet(ctx, st.apps, esc(id))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return appRecord{}, 0, errNoApp
	}
	if err != nil {
		return appRecord{}, 0, fmt.Errorf("bucket %s: %w", bucketApps, err)
	}
	r, err := decodeApp(id, e.Value())
	return r, e.Revision(), err
}

// updateApp changes an app's record with fn, as one compare-and-set: a
// change made meanwhile by another replica is read and fn applied again.
func (st *natsStore) updateApp(ctx context.Context, id string, fn func(*appRecord) error) (appRecord, uint64, error) {
	for attempt := 0; ; attempt++ {
		rec, rev, err := st.getApp(ctx, id)
		if err != nil {
			return rec, 0, err
		}
		if err := fn(&rec); err != nil {
			return rec, 0, err
		}
		data, err := json.Marshal(rec)
		if err != nil {
			return rec, 0, err
		}
		cctx, cancel := opCtx(ctx)
		rev, err = st.apps.Update(cctx, esc(id), data, rev)
		cancel()
		if err == nil {
			return rec, rev, nil
		}
		if !isWrongLast(err) || attempt >= 20 {
			return rec, 0, fmt.Errorf("bucket %s: %w", bucketApps, err)
		}
	}
}

func (st *natsStore) putSecret(ctx context.Context, app, secret string) (uint64, error) {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	rev, err := st.secrets.Put(ctx, esc(app), []byte(secret))
	if err != nil {
		return 0, fmt.Errorf("bucket %s: %w", bucketSecrets, err)
	}
	return rev, nil
}

// secretOf reads an app's enrollment secret, creating one when the app has
// none (a crash between its parts, or an import of an app without one).
func (st *natsStore) secretOf(ctx context.Context, app string) (string, uint64, error) {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	e, err := kvGet(ctx, st.secrets, esc(app))
	if err == nil {
		return string(e.Value()), e.Revision(), nil
	}
	if !errors.Is(err, jetstream.ErrKeyNotFound) {
		return "", 0, fmt.Errorf("bucket %s: %w", bucketSecrets, err)
	}
	secret, err := newSecret()
	if err != nil {
		return "", 0, err
	}
	rev, err := st.secrets.Create(ctx, esc(app), []byte(secret))
	if errors.Is(err, jetstream.ErrKeyExists) {
		return st.secretOf(ctx, app)
	}
	if err != nil {
		return "", 0, fmt.Errorf("bucket %s: %w", bucketSecrets, err)
	}
	st.log.Info("app had no enrollment secret; created one (new instances must present it)", "app_id", app)
	return secret, rev, nil
}

// enroll records a new instance's token hash, unless the instance is
// stored already (enrolled meanwhile through another replica, or revoked):
// then the stored record is returned with created false.
func (st *natsStore) enroll(ctx context.Context, app, instance, hash string) (rec instanceRecord, rev uint64, created bool, err error) {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	rec = instanceRecord{SHA256: hash}
	data, _ := json.Marshal(rec)
	rev, err = st.instances.Create(ctx, instanceKey(app, instance), data)
	if err == nil {
		return rec, rev, true, nil
	}
	if !errors.Is(err, jetstream.ErrKeyExists) {
		return rec, 0, false, fmt.Errorf("bucket %s: %w", bucketInstances, err)
	}
	e, err := kvGet(ctx, st.instances, instanceKey(app, instance))
	if err != nil {
		return rec, 0, false, fmt.Errorf("bucket %s: %w", bucketInstances, err)
	}
	rec = instanceRecord{}
	if err := json.Unmarshal(e.Value(), &rec); err != nil {
		return rec, 0, false, fmt.Errorf("bucket %s, key %s: %w", bucketInstances, e.Key(), err)
	}
	return rec, e.Revision(), false, nil
}

// instance reads an instance's stored record (its token hash, or its
// revocation) from the bucket's leader; found is false when none is
// stored (never enrolled, or admitted again since a revocation).
func (st *natsStore) instance(ctx context.Context, app, instance string) (rec instanceRecord, rev uint64, found bool, err error) {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	e, err := kvGet(ctx, st.instances, instanceKey(app, instance))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return rec, 0, false, nil
	}
	if err != nil {
		return rec, 0, false, fmt.Errorf("bucket %s: %w", bucketInstances, err)
	}
	if err := json.Unmarshal(e.Value(), &rec); err != nil {
		return rec, 0, false, fmt.Errorf("bucket %s, key %s: %w", bucketInstances, e.Key(), err)
	}
	return rec, e.Revision(), true, nil
}

// revoke replaces an instance's record with its revocation.
func (st *natsStore) revoke(ctx context.Context, app, instance string, at time.Time) (uint64, error) {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	data, _ := json.Marshal(instanceRecord{RevokedAt: &at})
	rev, err := st.instances.Put(ctx, instanceKey(app, instance), data)
	if err != nil {
		return 0, fmt.Errorf("bucket %s: %w", bucketInstances, err)
	}
	return rev, nil
}

// admit forgets a revoked instance: it enrolls anew with the secret.
func (st *natsStore) admit(ctx context.Context, app, instance string) error {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	if err := st.instances.Delete(ctx, instanceKey(app, instance)); err != nil {
		return fmt.Errorf("bucket %s: %w", bucketInstances, err)
	}
	return nil
}

// releaseWait stores a released wait of a recipe version, for one
// instance or (allInstances) for all. A key holds the version it was
// released in, so that a new version makes it stale without a delete.
func (st *natsStore) releaseWait(ctx context.Context, app string, version int64, instance, state string) (uint64, error) {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	data, _ := json.Marshal(waitRecord{RecipeVersion: version})
	rev, err := st.waits.Put(ctx, waitKey(app, instance, state), data)
	if err != nil {
		return 0, fmt.Errorf("bucket %s: %w", bucketWaits, err)
	}
	return rev, nil
}

// waitRecord is one released wait (bucket opsagent-waits).
type waitRecord struct {
	RecipeVersion int64 `json:"recipe_version"`
}

// relayRecord is what has succeeded of the references of a relayed wait
// in a recipe version (bucket opsagent-relay).
type relayRecord struct {
	RecipeVersion int64    `json:"recipe_version"`
	Done          []string `json:"done"`
}

// relayDone adds ref (instance/state) to what has succeeded of a relayed
// wait in version, and returns all that has: one compare-and-set, so that
// replicas each adding a reference never lose one another's. An earlier
// version's record is started afresh.
func (st *natsStore) relayDone(ctx context.Context, app string, version int64, wait, ref string) ([]string, error) {
	key := relayKey(app, wait)
	for attempt := 0; ; attempt++ {
		cctx, cancel := opCtx(ctx)
		var rec relayRecord
		var rev uint64
		e, err := kvGet(cctx, st.relay, key)
		switch {
		case err == nil:
			rev = e.Revision()
			_ = json.Unmarshal(e.Value(), &rec)
		case !errors.Is(err, jetstream.ErrKeyNotFound):
			cancel()
			return nil, fmt.Errorf("bucket %s: %w", bucketRelay, err)
		}
		switch {
		case rec.RecipeVersion > version:
			cancel()
			return nil, nil // a newer recipe: this one's waits no longer matter
		case rec.RecipeVersion < version:
			rec = relayRecord{RecipeVersion: version}
		}
		if slices.Contains(rec.Done, ref) {
			cancel()
			return rec.Done, nil
		}
		rec.Done = append(rec.Done, ref)
		data, _ := json.Marshal(rec)
		if rev == 0 {
			_, err = st.relay.Create(cctx, key, data)
		} else {
			_, err = st.relay.Update(cctx, key, data, rev)
		}
		cancel()
		if err == nil {
			return rec.Done, nil
		}
		if !isWrongLast(err) || attempt >= 20 {
			return nil, fmt.Errorf("bucket %s: %w", bucketRelay, err)
		}
	}
}

// logError logs one line per interval about writes that failed, and how
// many such lines were held back.
func (st *natsStore) logError(msg string, args ...any) {
	st.errMu.Lock()
	ok, suppressed := st.errLog.allow(time.Now())
	st.errMu.Unlock()
	if !ok {
		return
	}
	if suppressed > 0 {
		args = append(args, "suppressed_since_last", suppressed)
	}
	st.log.Error(msg, args...)
}
