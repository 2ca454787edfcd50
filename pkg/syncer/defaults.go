package syncer

// DefaultConfig is the syncer's defaults, read from the one place they are
// set (Config.defaults), for configurations that build on them (pkg/edge).
// Logger and Now stay nil: they are wiring, not settings.
func DefaultConfig() Config {
	var c Config
	c.defaults()
	c.Logger, c.Now = nil, nil
	return c
}
