package backend

import (
	"fmt"
	"strconv"
	"strings"
)

// Where the backend's state lives in NATS JetStream. Every id goes into
// subjects, KV keys and stream names through esc, so that an app id with a
// '.' or an instance id with a ':' is still exactly one token.
//
//	KV bucket            key                                value
//	opsagent-apps        <app>                              appRecord: recipe, version, update offer
//	opsagent-secrets     <app>                              the enrollment secret
//	opsagent-instances   <app>.<instance>                   instanceRecord: token hash, or revocation
//	opsagent-waits       <app>.<instance|=>.<state>         a released wait and its recipe version ("=": every instance)
//	opsagent-relay       <app>.<wait state>                 which references of a relayed wait succeeded, and in which version
//	opsagent-logstreams  <app>.<instance>.<stream|=>        streamSummary: high agent seq, last StateLog
//	opsagent-presence    <app>.<instance>                   presenceRecord: which replica holds it
//	opsagent-replicas    <session>                          a replica's heartbeat (bucket TTL)
//	opsagent-meta        api-token                          the API token (when none is configured)
//
//	stream opsagent-logs-<app>, subjects opsagent.app.<app>.>:
//	  opsagent.app.<app>.log.<instance>.<stream|=>    one StateLog per message; the stream seq is the API cursor
//	  opsagent.app.<app>.fence.<instance>.<stream>    the ownership marker of a protocol-2 log stream
//	  opsagent.app.<app>.gap                          placeholders an import deletes again
const (
	bucketApps       = "opsagent-apps"
	bucketSecrets    = "opsagent-secrets"
	bucketInstances  = "opsagent-instances"
	bucketWaits      = "opsagent-waits"
	bucketRelay      = "opsagent-relay"
	bucketLogStreams = "opsagent-logstreams"
	bucketPresence   = "opsagent-presence"
	bucketReplicas   = "opsagent-replicas"
	bucketMeta       = "opsagent-meta"

	logStreamPrefix = "opsagent-logs-"
	subjectPrefix   = "opsagent.app."

	// anyToken stands for every instance (a wait the relay released) or for
	// no log stream (a protocol-1 StateLog). esc never yields a bare "=".
	anyToken     = "="
	metaAPIToken = "api-token"
)

// esc makes s one token of a subject, a KV key or a stream name: bytes
// outside [A-Za-z0-9_-] become =XX. It is injective ('=' itself is
// escaped) and keeps the usual ids readable.
func esc(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-' {
			b.WriteByte(c)
			continue
		}
		fmt.Fprintf(&b, "=%02X", c)
	}
	return b.String()
}

// unesc reverses esc.
func unesc(s string) (string, error) {
	if !strings.Contains(s, "=") {
		return s, nil
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '=' {
			b.WriteByte(s[i])
			continue
		}
		if i+2 >= len(s) {
			return "", fmt.Errorf("bad escape in %q", s)
		}
		n, err := strconv.ParseUint(s[i+1:i+3], 16, 8)
		if err != nil {
			return "", fmt.Errorf("bad escape in %q", s)
		}
		b.WriteByte(byte(n))
		i += 2
	}
	return b.String(), nil
}

// streamToken is a log stream's token: anyToken for none.
func streamToken(stream string) string {
	if stream == "" {
		return anyToken
	}
	return esc(stream)
}

func logStreamName(app string) string { return logStreamPrefix + esc(app) }
func appSubjects(app string) string   { return subjectPrefix + esc(app) + ".>" }
func logsFilter(app string) string    { return subjectPrefix + esc(app) + ".log.>" }
func gapSubject(app string) string    { return subjectPrefix + esc(app) + ".gap" }
func logSubject(app, instance, stream string) string {
	return subjectPrefix + esc(app) + ".log." + esc(instance) + "." + streamToken(stream)
}
func fenceSubject(app, instance, stream string) string {
	return subjectPrefix + esc(app) + ".fence." + esc(instance) + "." + streamToken(stream)
}

func instanceKey(app, instance string) string { return esc(app) + "." + esc(instance) }
func waitKey(app, instance, state string) string {
	inst := anyToken
	if instance != allInstances {
		inst = esc(instance)
	}
	return esc(app) + "." + inst + "." + esc(state)
}
func relayKey(app, wait string) string { return esc(app) + "." + esc(wait) }
func summaryKey(app, instance, stream string) string {
	return esc(app) + "." + esc(instance) + "." + streamToken(stream)
}

// splitKey cuts a KV key into its n unescaped tokens (anyToken kept as is).
func splitKey(key string, n int) ([]string, error) {
	parts := strings.Split(key, ".")
	if len(parts) != n {
		return nil, fmt.Errorf("key %q: want %d tokens", key, n)
	}
	for i, p := range parts {
		if p == anyToken {
			continue
		}
		s, err := unesc(p)
		if err != nil {
			return nil, err
		}
		parts[i] = s
	}
	return parts, nil
}
