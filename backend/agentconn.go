package backend

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/protocol"
)

// agentConn is one agent's connection: one reader (serveAgent) and one
// writer goroutine fed by a bounded queue, so that a slow agent is
// disconnected instead of stalling a broadcast.
type agentConn struct {
	ws    *websocket.Conn
	queue chan *websocket.PreparedMessage
	done  chan struct{}
	once  sync.Once
	log   *slog.Logger

	app, instance string
	agentVersion  string
	since         time.Time
	recipeVersion atomic.Int64 // last recipe version sent to it
}

func (c *agentConn) send(frame []byte) {
	pm, err := websocket.NewPreparedMessage(websocket.TextMessage, frame)
	if err != nil {
		return
	}
	c.sendPrepared(pm)
}

// sendPrepared queues a frame framed once for every receiver (broadcasts).
func (c *agentConn) sendPrepared(pm *websocket.PreparedMessage) {
	select {
	case c.queue <- pm:
	case <-c.done:
	default:
		c.log.Warn("agent send queue full; disconnecting it", "instance_id", c.instance)
		c.close(websocket.CloseTryAgainLater, "send queue full")
	}
}

// close sends a close frame (best effort) and ends the connection.
func (c *agentConn) close(code int, reason string) {
	c.once.Do(func() {
		_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(code, reason), time.Now().Add(time.Second))
		close(c.done)
		_ = c.ws.Close()
	})
}

func (c *agentConn) writer(ping, dead time.Duration) {
	t := time.NewTicker(ping)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case frame := <-c.queue:
			_ = c.ws.SetWriteDeadline(time.Now().Add(dead))
			if err := c.ws.WritePreparedMessage(frame); err != nil {
				c.close(websocket.CloseAbnormalClosure, "")
				return
			}
		case <-t.C:
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(dead)); err != nil {
				c.close(websocket.CloseAbnormalClosure, "")
				return
			}
		}
	}
}

func (s *Server) serveAgent(w http.ResponseWriter, r *http.Request) {
	ws, err := s.up.Upgrade(w, r, nil)
	if err != nil {
		return // Upgrade already answered with an HTTP error
	}
	ws.SetReadLimit(int64(s.opts.MaxFrame))
	c := &agentConn{ws: ws, queue: make(chan *websocket.PreparedMessage, s.opts.SendQueue), done: make(chan struct{}), log: s.log, since: time.Now()}
	go c.writer(s.opts.PingInterval, s.opts.DeadAfter)
	defer func() {
		c.close(websocket.CloseNormalClosure, "")
		s.unregister(c)
	}()
	ws.SetPongHandler(func(string) error { return ws.SetReadDeadline(time.Now().Add(s.opts.DeadAfter)) })
	_ = ws.SetReadDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	remote := r.RemoteAddr
	for {
		_, data, err := ws.ReadMessage()
		if err != nil {
			if errors.Is(err, websocket.ErrReadLimit) {
				s.log.Warn("agent frame over the size limit; closing", "remote", remote, "instance_id", c.instance, "limit", s.opts.MaxFrame)
				c.close(websocket.CloseMessageTooBig, "frame too large")
			}
			return
		}
		_ = ws.SetReadDeadline(time.Now().Add(s.opts.DeadAfter))
		msg, err := protocol.DecodeLimit(data, s.opts.MaxFrame)
		if err != nil {
			s.log.Warn("ignored a bad frame from an agent", "remote", remote, "instance_id", c.instance, "err", err)
			continue
		}
		if c.instance == "" {
			if _, ok := msg.(*protocol.Handshake); !ok {
				s.log.Warn("agent sent a message before its Handshake; ignored", "remote", remote, "code", msg.MessageCode())
				continue
			}
		}
		switch m := msg.(type) {
		case *protocol.Handshake:
			if !s.handshake(c, m) {
				return
			}
		case *protocol.StateLog:
			s.stateLog(c, m)
		case *protocol.WaitQuery:
			s.waitQuery(c, m)
		case *protocol.Test:
			if m.InstanceID == "" {
				continue
			}
			frame, _ := protocol.Encode(&protocol.TestAns{Result: m.InstanceID == c.instance && m.AppID == c.app})
			c.send(frame)
		default:
			s.log.Warn("ignored a backend-to-agent message sent by an agent", "instance_id", c.instance, "code", msg.MessageCode())
		}
	}
}

// handshake checks the app and the token and registers the connection. It
// returns false when the connection must end.
func (s *Server) handshake(c *agentConn, m *protocol.Handshake) bool {
	log := s.log.With("instance_id", m.InstanceID, "app_id", m.AppID)
	if m.InstanceID == "" || m.AppID == "" || m.InstanceToken == "" {
		log.Warn("Handshake without instance id, app id or token; closing")
		c.close(websocket.ClosePolicyViolation, "handshake needs instance_id, app_id and instance_token")
		return false
	}
	s.mu.Lock()
	app, ok := s.apps[m.AppID]
	if !ok {
		s.mu.Unlock()
		log.Info("Handshake for an unknown app; AppNotReady")
		frame, _ := protocol.Encode(&protocol.AppNotReady{})
		c.send(frame)
		return true
	}
	h := hashToken(m.InstanceToken)
	known, seen := app.TokenHashes[m.InstanceID]
	if seen && !sameHash(known, h) {
		s.mu.Unlock()
		log.Warn("Handshake refused: instance token differs from the one first seen for this instance")
		c.close(websocket.ClosePolicyViolation, "instance token mismatch")
		return false
	}
	if !seen {
		app.TokenHashes[m.InstanceID] = h
		if err := s.store.appendToken(app.AppID, m.InstanceID, h); err != nil {
			s.mu.Unlock()
			log.Error("cannot store the instance token", "err", err)
			c.close(websocket.CloseInternalServerErr, "backend storage error")
			return false
		}
	}
	c.app, c.instance, c.agentVersion = m.AppID, m.InstanceID, m.AgentVersion
	byInst := s.agents[m.AppID]
	if byInst == nil {
		byInst = map[string]*agentConn{}
		s.agents[m.AppID] = byInst
	}
	old := byInst[m.InstanceID]
	byInst[m.InstanceID] = c
	var frames [][]byte
	if app.RecipeVersion > 0 {
		f, _ := protocol.Encode(app.recipe())
		frames = append(frames, f)
		c.recipeVersion.Store(app.RecipeVersion)
		for _, id := range app.Waits[m.InstanceID] {
			f, _ := protocol.Encode(&protocol.StatePush{RecipeVersion: app.RecipeVersion, StateID: id})
			frames = append(frames, f)
		}
	}
	if u := app.Update; u != nil && u.Version != m.AgentVersion {
		f, _ := protocol.Encode(u)
		frames = append(frames, f)
	}
	s.mu.Unlock()
	if old != nil && old != c {
		old.close(websocket.CloseNormalClosure, "replaced by a newer connection")
	}
	init := ""
	if m.InitErrors != nil {
		init = *m.InitErrors
	}
	log.Info("agent connected", "agent_version", m.AgentVersion, "init_errors", init, "first_seen", !seen)
	for _, f := range frames {
		c.send(f)
	}
	return true
}

func (s *Server) unregister(c *agentConn) {
	if c.instance == "" {
		return
	}
	s.mu.Lock()
	if s.agents[c.app][c.instance] == c {
		delete(s.agents[c.app], c.instance)
	}
	s.mu.Unlock()
	s.log.Info("agent disconnected", "instance_id", c.instance, "app_id", c.app)
}

func (s *Server) stateLog(c *agentConn, m *protocol.StateLog) {
	if m.AppID != "" && m.AppID != c.app || m.InstanceID != "" && m.InstanceID != c.instance {
		s.log.Warn("StateLog names another instance or app; ignored", "instance_id", c.instance, "claimed", m.InstanceID+"/"+m.AppID)
		return
	}
	s.mu.Lock()
	app := s.apps[c.app]
	app.LogSeq++
	e := LogEntry{Seq: app.LogSeq, ReceivedAt: time.Now().UTC(), InstanceID: c.instance, RecipeVersion: m.RecipeVersion,
		StateID: m.StateID, Result: m.Result, Comment: m.Comment, Stdout: m.Stdout}
	err := s.store.appendLog(c.app, e)
	s.mu.Unlock()
	if err != nil {
		s.log.Error("cannot store a StateLog", "app_id", c.app, "err", err)
		return
	}
	lvl := slog.LevelInfo
	if !m.Result {
		lvl = slog.LevelWarn
	}
	comment := ""
	if m.Comment != nil {
		comment = firstLine(*m.Comment)
	}
	s.log.Log(context.Background(), lvl, "StateLog", "instance_id", c.instance, "recipe_version", m.RecipeVersion, "state_id", m.StateID, "result", m.Result, "comment", comment)
}

func (s *Server) waitQuery(c *agentConn, m *protocol.WaitQuery) {
	s.mu.Lock()
	app := s.apps[c.app]
	wl := &protocol.WaitList{RecipeVersion: m.RecipeVersion, Waited: []protocol.WaitEntry{}}
	if app.RecipeVersion == m.RecipeVersion {
		for _, id := range app.Waits[c.instance] {
			wl.Waited = append(wl.Waited, protocol.WaitEntry{InstanceID: c.instance, StateID: id})
		}
	}
	s.mu.Unlock()
	frame, _ := protocol.Encode(wl)
	c.send(frame)
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + " …"
	}
	return s
}
