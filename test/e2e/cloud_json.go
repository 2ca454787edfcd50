package e2e

import (
	"encoding/json"
	"io"
)

func cloudDecodeJSON(r io.Reader, v any) error { return json.NewDecoder(r).Decode(v) }

func cloudUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
