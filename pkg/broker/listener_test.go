package broker

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
)

// TestGuardFirstPacket: the guard passes a CONNECT within the limit, byte
// by byte or whole, and refuses anything else before it is buffered.
func TestGuardFirstPacket(t *testing.T) {
	const limit = 100
	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"connect within the limit", append(header(1, 0, 100), make([]byte, 100)...), nil},
		{"connect over the limit", header(1, 0, 101), errConnectTooLarge},
		{"connect announcing 200 MB", header(1, 0, 200<<20), errConnectTooLarge},
		{"publish first", header(3, 0, 10), errNotConnect},
		{"malformed length", []byte{0x10, 0x80, 0x80, 0x80, 0x80, 0x01}, errConnectTooLarge},
		{"later packets are mochi's", append(append(header(1, 0, 2), 0, 0), header(3, 0, 200<<20)...), nil},
	}
	for _, tt := range tests {
		for _, chunk := range []int{1, 4096} {
			server, client := net.Pipe()
			go func() {
				for b := tt.in; len(b) > 0; {
					n := min(chunk, len(b))
					if _, err := client.Write(b[:n]); err != nil {
						break
					}
					b = b[n:]
				}
				client.Close()
			}()
			g := &guardConn{Conn: server, max: limit}
			var got bytes.Buffer
			_, err := io.Copy(&got, g)
			server.Close()
			if !errors.Is(err, tt.want) {
				t.Errorf("%s (chunks of %d): err = %v, want %v", tt.name, chunk, err, tt.want)
			}
			if tt.want == nil && !bytes.Equal(got.Bytes(), tt.in) {
				t.Errorf("%s (chunks of %d): passed %d of %d bytes", tt.name, chunk, got.Len(), len(tt.in))
			}
		}
	}
}
