package conn

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/gorilla/websocket"

	"github.com/visualops/opsagent/agent/outbox"
	"github.com/visualops/opsagent/protocol"
)

// session runs one connection until it fails or ctx is done.
func (m *Manager) session(ctx context.Context, refresh bool) error {
	target, err := m.target()
	if err != nil {
		return err
	}
	id, err := m.opts.Identity(ctx, refresh)
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	m.mu.Lock()
	m.id = id
	m.mu.Unlock()

	dctx, cancel := context.WithTimeout(ctx, m.opts.HandshakeTimeout)
	ws, resp, err := m.dialer.DialContext(dctx, target, nil)
	cancel()
	if err != nil {
		if resp != nil {
			return fmt.Errorf("connect %s: %w (HTTP %s)", Redact(target), err, resp.Status)
		}
		return fmt.Errorf("connect %s: %w", Redact(target), err)
	}
	defer ws.Close()
	// A frame over the limit makes gorilla fail the read and close the
	// socket (1009): that is a connection error, so the agent reconnects.
	// It cannot skip just that frame, as the rest of it is still in flight.
	ws.SetReadLimit(int64(m.opts.MaxFrame))

	hs, err := protocol.Encode(&protocol.Handshake{Identity: id.wire(m.out.Stream())})
	if err != nil {
		return err
	}
	_ = ws.SetWriteDeadline(time.Now().Add(m.opts.DeadAfter))
	if err := ws.WriteMessage(websocket.TextMessage, hs); err != nil {
		return fmt.Errorf("send Handshake: %w", err)
	}
	m.log.Info("connected; Handshake sent", "backend", Redact(target), "instance_id", id.InstanceID, "app_id", id.AppID)
	m.setConnected(true, nil)
	if m.opts.Handler != nil {
		m.opts.Handler.Connected()
	}

	c := &link{m: m, ws: ws, control: make(chan []byte, 16), done: make(chan struct{}), negotiated: make(chan struct{})}
	// Which protocol the backend speaks shows in its first frame: a
	// StateLogAck (2), anything else or nothing within AckWait (1). No
	// StateLog is sent before that is known.
	ackTimer := time.AfterFunc(m.opts.AckWait, func() { c.negotiate(1, 0) })
	defer ackTimer.Stop()
	readErr := make(chan error, 1)
	go func() { readErr <- c.read(ctx) }()
	writeErr := make(chan error, 1)
	go func() { writeErr <- c.write(ctx) }()

	select {
	case err = <-readErr:
		close(c.done)
		if errors.Is(err, errAppNotReady) {
			// Say goodbye properly: the backend asked us to come back later.
			c.sendClose("app not ready; handshaking again later")
		}
		// Closing the socket unblocks a writer stuck on a peer that stopped
		// reading; an unfinished StateLog stays queued for the next session.
		_ = ws.Close()
		<-writeErr
	case err = <-writeErr:
		close(c.done)
		_ = ws.Close() // unblocks the reader
		<-readErr
	case <-m.kick:
		close(c.done)
		c.sendClose("backend changed")
		_ = ws.Close()
		<-writeErr
		<-readErr
		return errMoved
	case <-ctx.Done():
		close(c.done)
		// The writer sends the close frame (1000). A peer that stopped
		// reading must not hold the shutdown: half a second for the writer,
		// half a second for the backend's answering close frame.
		wait := func(ch chan error) {
			t := time.NewTimer(500 * time.Millisecond)
			defer t.Stop()
			select {
			case <-ch:
			case <-t.C:
				_ = ws.Close()
				<-ch
			}
		}
		wait(writeErr)
		wait(readErr)
		m.log.Info("connection closed", "backend", Redact(target))
		return nil
	}
	return err
}

// link is one live connection.
type link struct {
	m       *Manager
	ws      *websocket.Conn
	control chan []byte   // frames the reader wants sent (Test answers)
	done    chan struct{} // closed when the session ends

	once       sync.Once
	negotiated chan struct{} // closed once the protocol is known
	protocol   int           // 1 or 2, set before negotiated is closed
	acked      int64         // protocol 2: the backend's first acknowledgement
}

// negotiate records what the backend speaks; only the first call counts.
func (c *link) negotiate(version int, acked int64) {
	c.once.Do(func() {
		c.protocol, c.acked = version, acked
		c.m.mu.Lock()
		c.m.protocol = version
		c.m.mu.Unlock()
		if version == 2 {
			c.m.out.AckHandshake(acked)
		} else {
			c.m.log.Info("the backend speaks protocol 1: StateLogs leave the outbox once written to the socket")
		}
		close(c.negotiated)
		if f := c.m.opts.OnEstablished; f != nil {
			f()
		}
	})
}

func (c *link) read(ctx context.Context) error {
	m := c.m
	extend := func() { _ = c.ws.SetReadDeadline(time.Now().Add(m.opts.DeadAfter)) }
	extend()
	c.ws.SetPongHandler(func(string) error { extend(); return nil })
	c.ws.SetPingHandler(func(data string) error {
		extend()
		// Answer pings from the backend; WriteControl is safe next to the writer.
		err := c.ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(5*time.Second))
		if err != nil && !errors.Is(err, websocket.ErrCloseSent) {
			return err
		}
		return nil
	})
	for {
		typ, data, err := c.ws.ReadMessage()
		if err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				if ce.Code == websocket.ClosePolicyViolation {
					return fmt.Errorf("backend refused this agent (%d %s): check the instance token and app id", ce.Code, ce.Text)
				}
				return fmt.Errorf("backend closed the connection (%d %s)", ce.Code, ce.Text)
			}
			if errors.Is(err, websocket.ErrReadLimit) {
				return fmt.Errorf("frame larger than %d bytes; connection dropped", m.opts.MaxFrame)
			}
			return fmt.Errorf("read: %w", err)
		}
		extend()
		if typ != websocket.TextMessage {
			m.badFrame(errors.New("binary frame; only text frames carry messages"))
			continue
		}
		msg, err := protocol.DecodeLimit(data, m.opts.MaxFrame)
		if err != nil {
			m.badFrame(err)
			continue
		}
		if ack, ok := msg.(*protocol.StateLogAck); ok {
			c.acknowledged(ack)
			continue
		}
		if _, ok := msg.(*protocol.AppNotReady); ok {
			return errAppNotReady // not an accepted Handshake
		}
		c.negotiate(1, 0) // the first frame was not a StateLogAck
		switch msg := msg.(type) {
		case *protocol.Test:
			c.answerTest()
		case *protocol.TestAns:
			e := ""
			if msg.Error != nil {
				e = *msg.Error
			}
			m.log.Info("backend test answer", "result", msg.Result, "error", e)
		case *protocol.Handshake, *protocol.StateLog, *protocol.WaitQuery:
			m.badFrame(fmt.Errorf("%s is an agent-to-backend message", msg.MessageCode()))
		default:
			if m.opts.Handler != nil {
				m.opts.Handler.Deliver(ctx, msg)
			}
		}
	}
}

// nextLog returns the next StateLog to write: none before the protocol is
// known; with protocol 2, the first above the backend's acknowledgement
// (everything it has not stored is sent again after a reconnect).
func (c *link) nextLog(sent *int64) (outbox.Entry, bool) {
	select {
	case <-c.negotiated:
	default:
		return outbox.Entry{}, false
	}
	if *sent < c.acked {
		*sent = c.acked
	}
	return c.m.out.After(*sent)
}

// acknowledged handles a StateLogAck: the first one after the Handshake
// says the backend speaks protocol 2; every one removes what it covers.
func (c *link) acknowledged(ack *protocol.StateLogAck) {
	m := c.m
	if ack.LogStream != m.out.Stream() {
		m.badFrame(fmt.Errorf("StateLogAck for log stream %q, not ours (%q)", ack.LogStream, m.out.Stream()))
		return
	}
	select {
	case <-c.negotiated:
		if c.protocol != 2 {
			m.badFrame(errors.New("StateLogAck from a backend that did not start with one; ignored"))
			return
		}
		if next := m.out.Status().NextSeq; ack.Seq >= next {
			m.badFrame(fmt.Errorf("StateLogAck for seq %d, beyond the last StateLog (%d)", ack.Seq, next-1))
			return
		}
		m.out.AckThrough(ack.Seq)
	default:
		c.negotiate(2, ack.Seq)
	}
}

func (m *Manager) badFrame(err error) {
	m.mu.Lock()
	m.droppedFrames++
	m.mu.Unlock()
	m.log.Warn("ignored a bad frame from the backend", "err", err)
}

func (c *link) answerTest() {
	c.m.mu.Lock()
	id := c.m.id
	c.m.mu.Unlock()
	frame, err := protocol.Encode(&protocol.Test{Identity: id.wire(c.m.out.Stream())})
	if err != nil {
		return
	}
	select {
	case c.control <- frame:
	case <-c.done:
	}
}

// write is the only goroutine writing data frames: Test answers first,
// then a pending WaitQuery, then the outbox in order, plus pings.
func (c *link) write(ctx context.Context) error {
	m := c.m
	ping := time.NewTicker(m.opts.PingInterval)
	defer ping.Stop()
	send := func(frame []byte) error {
		_ = c.ws.SetWriteDeadline(time.Now().Add(m.opts.DeadAfter))
		return c.ws.WriteMessage(websocket.TextMessage, frame)
	}
	var sent int64 // seq of the last StateLog written on this connection
	negotiated := c.negotiated
	for {
		// Drain what is ready before sleeping; pings go out even while a
		// long backlog is flushed, so the backend's pongs keep us alive.
		// The session's end is checked first so that a long backlog does
		// not delay shutdown.
		select {
		case <-c.done:
			if ctx.Err() != nil {
				c.sendClose("agent stopping")
			}
			return nil
		case <-ping.C:
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(m.opts.DeadAfter)); err != nil {
				return fmt.Errorf("ping: %w", err)
			}
			continue
		case frame := <-c.control:
			if err := send(frame); err != nil {
				return fmt.Errorf("write: %w", err)
			}
			continue
		default:
		}
		if v := m.takeWaitQuery(); v > 0 {
			iid, app := m.currentIDs(&protocol.StateLog{})
			frame, _ := protocol.Encode(&protocol.WaitQuery{InstanceID: iid, AppID: app, RecipeVersion: v})
			if err := send(frame); err != nil {
				m.QueryWaits(v) // ask again on the next connection
				return fmt.Errorf("write: %w", err)
			}
			continue
		}
		if e, ok := c.nextLog(&sent); ok {
			sl := e.Log
			sl.InstanceID, sl.AppID = m.currentIDs(&sl)
			if c.protocol != 2 {
				sl.Seq = 0 // a protocol-1 backend knows no seq
			}
			frame, err := protocol.Encode(&sl)
			if err == nil {
				if err := send(frame); err != nil {
					return fmt.Errorf("write: %w", err)
				}
			}
			sent = e.Seq
			if c.protocol != 2 {
				m.out.AckThrough(e.Seq) // protocol 1: written is delivered
			}
			continue
		}
		select {
		case <-ctx.Done():
			c.sendClose("agent stopping")
			return nil
		case <-c.done:
			if ctx.Err() != nil {
				c.sendClose("agent stopping")
			}
			return nil
		case frame := <-c.control:
			if err := send(frame); err != nil {
				return fmt.Errorf("write: %w", err)
			}
		case <-m.wqNotify:
		case <-m.out.Notify():
		case <-negotiated:
			negotiated = nil
		case <-ping.C:
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(m.opts.DeadAfter)); err != nil {
				return fmt.Errorf("ping: %w", err)
			}
		}
	}
}

// sendClose starts the close handshake (1000). WriteControl may be called
// next to the writer goroutine; it waits at most half a second for it.
func (c *link) sendClose(reason string) {
	_ = c.ws.WriteControl(websocket.CloseMessage,
		websocket.FormatCloseMessage(websocket.CloseNormalClosure, reason), time.Now().Add(500*time.Millisecond))
}
