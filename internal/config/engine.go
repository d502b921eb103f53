package config

import (
	"fmt"
	"strings"
)

// Engine is [agent] engine: which executor runs each state. It is parsed
// once, when the config is read (any case is accepted, as the 2014 file
// was hand-written); everything downstream compares the constants.
type Engine string

// The engines.
const (
	EngineAuto   Engine = "auto"   // native modules natively, the rest through Salt
	EngineNative Engine = "native" // native modules only: no virtualenv, no states repository
	EngineSalt   Engine = "salt"   // every module through Salt, as the 2014 agent did
)

// ParseEngine reads an engine name, in any case.
func ParseEngine(v string) (Engine, error) {
	switch e := Engine(strings.ToLower(strings.TrimSpace(v))); e {
	case EngineAuto, EngineNative, EngineSalt:
		return e, nil
	}
	return "", fmt.Errorf("expected one of %s, %s, %s", EngineAuto, EngineNative, EngineSalt)
}

// NeedsSalt reports whether the engine may run states through the Salt
// bridge, and so needs the virtualenv and the states repository.
func (e Engine) NeedsSalt() bool { return e != EngineNative }

func engineField(section, key, def string, p func(*Config) *Engine) field {
	return field{section: section, key: key, def: def,
		get: func(c *Config) string { return string(*p(c)) },
		set: func(c *Config, v string) error {
			e, err := ParseEngine(v)
			if err != nil {
				return err
			}
			*p(c) = e
			return nil
		},
	}
}
