package sinks

import (
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"time"

	"github.com/outpost-edge/outpost/pkg/config"
)

// Sink types.
const (
	TypeNATS  = "nats"  // NATS JetStream
	TypeKafka = "kafka" // Apache Kafka (or anything speaking its protocol)
)

// Config is one export sink, an item of `export.sinks`.
type Config struct {
	// Name identifies the sink: its replicated cursor, metrics label and
	// /api/v1/sinks entry. Renaming a sink starts it over from the oldest
	// record kept.
	Name string `yaml:"name" json:"name"`
	Type string `yaml:"type" json:"type"` // nats or kafka

	// NATS JetStream: the server URL(s, comma-separated; user:password@
	// allowed), the subject every record is published on, and the stream
	// that captures it (default: the sink's name), created with the subject
	// if it does not exist.
	URL     string `yaml:"url,omitempty" json:"url,omitempty"`
	Subject string `yaml:"subject,omitempty" json:"subject,omitempty"`
	Stream  string `yaml:"stream,omitempty" json:"stream,omitempty"`

	// Kafka: seed brokers (host:port) and the topic.
	Brokers []string `yaml:"brokers,omitempty" json:"brokers,omitempty"`
	Topic   string   `yaml:"topic,omitempty" json:"topic,omitempty"`
}

// Options is `export` in cloud-sync's configuration: the sinks and how the
// leader drives them. Zero values take the defaults of DefaultOptions.
type Options struct {
	Sinks []Config `yaml:"sinks"`
	// CursorInterval is how often, at most, a sink's position is
	// replicated (one raft entry per sink that moved). A new leader
	// re-sends at most about this much (same keys).
	CursorInterval time.Duration `yaml:"cursor_interval"`
	// RetryMax caps the backoff between attempts at a failing sink.
	RetryMax time.Duration `yaml:"retry_max"`
	// Batch is how many records one publish carries (pipelined, then
	// waited for together): the window of unacknowledged records.
	Batch int `yaml:"batch"`
}

// maxBatch bounds Options.Batch: the records one publisher has in flight.
const maxBatch = 10000

// DefaultOptions are the built-in settings: the one source of the sinks'
// defaults.
func DefaultOptions() Options {
	return Options{CursorInterval: time.Second, RetryMax: 30 * time.Second, Batch: 512}
}

func (o *Options) defaults() {
	d := DefaultOptions()
	if o.CursorInterval <= 0 {
		o.CursorInterval = d.CursorInterval
	}
	if o.RetryMax <= 0 {
		o.RetryMax = d.RetryMax
	}
	if o.Batch <= 0 {
		o.Batch = d.Batch
	}
}

var (
	// A sink name is also the default stream name: JetStream forbids
	// '.', '*', '>' and white space there.
	nameRe = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
	// Kafka's own rule for topic names.
	topicRe = regexp.MustCompile(`^[A-Za-z0-9._-]{1,249}$`)
)

// Validate reports every problem of o under key (normally "export"), each
// naming the sink's field, as "export.sinks[1].subject".
func (o Options) Validate(key string, errs *config.Errors) {
	if o.CursorInterval < 0 {
		errs.Add(key+".cursor_interval", "%s must be positive (0: the default, 1s)", o.CursorInterval)
	}
	if o.RetryMax < 0 {
		errs.Add(key+".retry_max", "%s must be positive (0: the default, 30s)", o.RetryMax)
	}
	if o.Batch < 0 || o.Batch > maxBatch {
		errs.Add(key+".batch", "%d must be between 1 and %d (0: the default, 512)", o.Batch, maxBatch)
	}
	seen := map[string]int{}
	for i, s := range o.Sinks {
		k := fmt.Sprintf("%s.sinks[%d]", key, i)
		switch {
		case s.Name == "":
			errs.Add(k+".name", "is required")
		case !nameRe.MatchString(s.Name):
			errs.Add(k+".name", "%q must match [A-Za-z0-9_-]{1,64}", s.Name)
		default:
			if j, dup := seen[s.Name]; dup {
				errs.Add(k+".name", "%q is already the name of sinks[%d]: each sink needs its own (it names its cursor)", s.Name, j)
			}
			seen[s.Name] = i
		}
		switch s.Type {
		case TypeNATS:
			s.validateNATS(k, errs)
		case TypeKafka:
			s.validateKafka(k, errs)
		case "":
			errs.Add(k+".type", "is required: nats or kafka")
		default:
			errs.Add(k+".type", "%q must be nats or kafka", s.Type)
		}
	}
}

func (s Config) validateNATS(k string, errs *config.Errors) {
	if s.URL == "" {
		errs.Add(k+".url", "is required for a nats sink (e.g. nats://127.0.0.1:4222)")
	}
	for _, u := range strings.Split(s.URL, ",") {
		if s.URL == "" {
			break
		}
		p, err := url.Parse(strings.TrimSpace(u))
		if err != nil || p.Host == "" {
			errs.Add(k+".url", "%q is not a server URL (nats://host:port, tls://host:port)", redact(u))
			continue
		}
		switch p.Scheme {
		case "nats", "tls", "ws", "wss":
		default:
			errs.Add(k+".url", "%q: scheme must be nats, tls, ws or wss", redact(u))
		}
	}
	if err := checkSubject(s.Subject); err != nil {
		errs.Add(k+".subject", "%v", err)
	}
	if s.Stream != "" && !nameRe.MatchString(s.Stream) {
		errs.Add(k+".stream", "%q must match [A-Za-z0-9_-]{1,64}", s.Stream)
	}
	if len(s.Brokers) > 0 || s.Topic != "" {
		errs.Add(k, "brokers and topic are for kafka sinks; a nats sink takes url, subject and stream")
	}
}

func (s Config) validateKafka(k string, errs *config.Errors) {
	if len(s.Brokers) == 0 {
		errs.Add(k+".brokers", "is required for a kafka sink: a list of host:port")
	}
	for _, b := range s.Brokers {
		if err := config.CheckHostPort(b); err != nil {
			errs.Add(k+".brokers", "%v", err)
		}
	}
	switch {
	case s.Topic == "":
		errs.Add(k+".topic", "is required for a kafka sink")
	case !topicRe.MatchString(s.Topic) || s.Topic == "." || s.Topic == "..":
		errs.Add(k+".topic", "%q must match [A-Za-z0-9._-]{1,249}", s.Topic)
	}
	if s.URL != "" || s.Subject != "" || s.Stream != "" {
		errs.Add(k, "url, subject and stream are for nats sinks; a kafka sink takes brokers and topic")
	}
}

// checkSubject accepts a literal NATS subject: dot-separated tokens, none
// empty, no wildcards (a publish goes to one subject) or white space.
func checkSubject(s string) error {
	if s == "" {
		return fmt.Errorf("is required for a nats sink (e.g. outpost.export)")
	}
	for _, tok := range strings.Split(s, ".") {
		if tok == "" || tok == "*" || tok == ">" || strings.ContainsAny(tok, " \t\r\n*>") {
			return fmt.Errorf("%q must be a literal subject: dot-separated tokens without wildcards or spaces", s)
		}
	}
	return nil
}

// Target is where the sink delivers, for status and logs, without
// credentials.
func (s Config) Target() string {
	if s.Type == TypeKafka {
		return strings.Join(s.Brokers, ",") + "/" + s.Topic
	}
	return redact(s.URL) + "/" + s.Subject
}

// Masked is s with the password in its URL replaced, for printing.
func (s Config) Masked() Config {
	s.URL = redact(s.URL)
	return s
}

// StreamName is the JetStream stream of a nats sink.
func (s Config) StreamName() string {
	if s.Stream != "" {
		return s.Stream
	}
	return s.Name
}

// redact masks the password of every URL in a comma-separated list.
func redact(list string) string {
	parts := strings.Split(list, ",")
	for i, u := range parts {
		if p, err := url.Parse(strings.TrimSpace(u)); err == nil && p.User != nil {
			// Redacted writes "xxxxx" for the password (and would escape
			// the mask's asterisks).
			parts[i] = strings.Replace(p.Redacted(), ":xxxxx@", ":"+config.Mask+"@", 1)
		}
	}
	return strings.Join(parts, ",")
}
