package config

import (
	"errors"
	"sync"
)

// Owner is the one writer of the config file. Components read copies
// (Current) and are told about changes (OnChange); every change goes
// through Update, which validates, saves atomically and only then
// publishes. It replaces the shared *Config that the identity refresher
// used to overwrite from the connection goroutine while others read it.
type Owner struct {
	mu   sync.Mutex // serialises Update: one writer at a time
	doc  *Config    // the live document; only Update touches it
	cur  *Config    // read-only copy handed to readers
	subs []func(before, after *Config)
	rmu  sync.RWMutex // guards cur and subs
}

// NewOwner takes ownership of c (loaded from its file).
func NewOwner(c *Config) *Owner {
	return &Owner{doc: c, cur: c.copyValues()}
}

// Current returns a read-only copy of the config. It is never changed
// afterwards; call Current again for newer values.
func (o *Owner) Current() *Config {
	o.rmu.RLock()
	defer o.rmu.RUnlock()
	return o.cur
}

// OnChange registers f, called after every saved change with the values
// before and after, in order, on the goroutine that made the change.
func (o *Owner) OnChange(f func(before, after *Config)) {
	o.rmu.Lock()
	o.subs = append(o.subs, f)
	o.rmu.Unlock()
}

// ErrNoChange may be returned by an Update function that decided to leave
// the config as it is; Update then returns (false, nil).
var ErrNoChange = errors.New("config: no change")

// Update applies change to a copy of the config, validates it, saves the
// file and publishes the new values. A change that leaves the values as
// they were writes nothing. It reports whether anything was saved.
func (o *Owner) Update(change func(c *Config) error) (bool, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	next := *o.doc // typed sections are values; the document is shared
	if err := change(&next); err != nil {
		if errors.Is(err, ErrNoChange) {
			return false, nil
		}
		return false, err
	}
	old := o.Current()
	if next.Global == old.Global && next.Userdata == old.Userdata && next.Module == old.Module &&
		next.Network == old.Network && next.Salt == old.Salt && next.Agent == old.Agent && !next.unsaved {
		return false, nil
	}
	if err := next.Validate(); err != nil {
		return false, err
	}
	if err := next.save(""); err != nil {
		return false, err
	}
	*o.doc = next
	cp := next.copyValues()
	o.rmu.Lock()
	o.cur = cp
	subs := make([]func(before, after *Config), len(o.subs))
	copy(subs, o.subs)
	o.rmu.Unlock()
	for _, f := range subs {
		f(old, cp)
	}
	return true, nil
}
