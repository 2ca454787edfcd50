package api

import (
	"crypto/sha256"
	"encoding/base64"
	"strconv"
	"strings"

	"github.com/gofiber/fiber/v2"
	"github.com/valyala/fasthttp"
)

// HTTP caching and compression, shaped for mini-programs (wx.request: at
// most 10 requests at once, often on a slow mobile link):
//
//   - Cache-Control: every response is "no-store" unless its handler marks
//     it revalidatable (revalidate): a read whose answer is a function of
//     the stored data (a device, the device list, a closed range of
//     readings, stats, the newest reading). Those are "private, no-cache":
//     a client may keep them but must ask again before reusing one, with
//     If-None-Match. Tokens (login, refresh) and errors stay no-store.
//   - ETag: a revalidatable 200 carries a weak ETag, a hash of its
//     uncompressed body, so it is right by construction: any change of what
//     the client would receive (a new reading, a role that hides a device,
//     a device coming online) changes it. It is weak because the gzip and
//     identity encodings of one answer share it. A matching If-None-Match
//     is answered 304 with no body. The handler still does its work (the
//     saving is the bytes on the phone's link, not the edge's CPU).
//   - gzip: a body of at least compressMin bytes is gzipped when the
//     request's Accept-Encoding allows gzip; smaller ones are not (the
//     framing costs more than it saves). Every response says
//     Vary: Accept-Encoding.

// compressMin is the smallest body that is gzipped.
const compressMin = 1024

// localRevalidate marks a response revalidatable (Locals key).
const localRevalidate = "revalidate"

// Cache-Control values.
const (
	cacheNoStore    = "no-store"
	cacheRevalidate = "private, no-cache"
)

// revalidate marks the response being built as cacheable with
// revalidation: if it ends as a 200, conditional gets an ETag and a 304.
func revalidate(c *fiber.Ctx) { c.Locals(localRevalidate, true) }

// conditional runs the handler, then gives a revalidatable 200 its ETag,
// answers a matching If-None-Match with 304, and gzips what remains if the
// client accepts it.
func conditional(c *fiber.Ctx) error {
	c.Set(fiber.HeaderCacheControl, cacheNoStore)
	c.Append(fiber.HeaderVary, fiber.HeaderAcceptEncoding)
	if err := c.Next(); err != nil {
		return err // rendered by the error handler: small, never cached
	}
	resp := c.Response()
	if rv, _ := c.Locals(localRevalidate).(bool); rv && resp.StatusCode() == fiber.StatusOK {
		sum := sha256.Sum256(resp.Body())
		tag := `W/"` + base64.RawURLEncoding.EncodeToString(sum[:16]) + `"`
		c.Set(fiber.HeaderETag, tag)
		c.Set(fiber.HeaderCacheControl, cacheRevalidate)
		if etagMatches(c.Get(fiber.HeaderIfNoneMatch), tag) {
			resp.SetStatusCode(fiber.StatusNotModified)
			resp.ResetBody()
			resp.Header.Del(fiber.HeaderContentType)
			return nil
		}
	}
	if len(resp.Body()) >= compressMin && acceptsGzip(c.Get(fiber.HeaderAcceptEncoding)) &&
		len(resp.Header.Peek(fiber.HeaderContentEncoding)) == 0 {
		// The fastest level: JSON still shrinks several times, and an edge
		// gateway's CPU is better spent on ingest.
		gz := fasthttp.AppendGzipBytesLevel(nil, resp.Body(), fasthttp.CompressBestSpeed)
		resp.SetBodyRaw(gz)
		resp.Header.Set(fiber.HeaderContentEncoding, "gzip")
	}
	return nil
}

// etagMatches applies If-None-Match's weak comparison (RFC 9110 13.1.2):
// "*" or any listed tag equal to tag, W/ prefixes ignored.
func etagMatches(header, tag string) bool {
	if header == "" {
		return false
	}
	opaque := strings.TrimPrefix(tag, "W/")
	for _, t := range strings.Split(header, ",") {
		t = strings.TrimSpace(t)
		if t == "*" || strings.TrimPrefix(t, "W/") == opaque {
			return true
		}
	}
	return false
}

// acceptsGzip reports whether an Accept-Encoding value allows gzip: listed
// (or "*") without q=0.
func acceptsGzip(header string) bool {
	if header == "" {
		return false
	}
	for _, part := range strings.Split(header, ",") {
		coding, params, _ := strings.Cut(part, ";")
		coding = strings.ToLower(strings.TrimSpace(coding))
		if coding != "gzip" && coding != "x-gzip" && coding != "*" {
			continue
		}
		return !zeroQ(params)
	}
	return false
}

// zeroQ reports whether Accept-Encoding parameters carry q=0 (0, 0.0, 0.000).
func zeroQ(params string) bool {
	for _, p := range strings.Split(params, ";") {
		k, v, ok := strings.Cut(strings.TrimSpace(p), "=")
		if !ok || !strings.EqualFold(strings.TrimSpace(k), "q") {
			continue
		}
		q, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		return err == nil && q == 0
	}
	return false
}
