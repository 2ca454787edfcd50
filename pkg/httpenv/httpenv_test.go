package httpenv

import (
	"fmt"
	"io"
	"net/http/httptest"
	"testing"

	"github.com/gofiber/fiber/v2"

	"github.com/outpost-edge/outpost/pkg/wire"
)

func TestEnvelopes(t *testing.T) {
	app := fiber.New()
	app.Get("/ok", func(c *fiber.Ctx) error { return OK(c, fiber.Map{"a": 1}) })
	app.Get("/fail", func(c *fiber.Ctx) error { return Fail(c, 409, "taken") })
	app.Get("/raw", func(c *fiber.Ctx) error { return SendOK(c, append(AppendOK(nil), `[1,2]`...)) })
	app.Get("/rule", func(c *fiber.Ctx) error {
		_, err := wire.ParseLocation("NaN", "0")
		return Fail(c, Status(err), err.Error())
	})
	tests := []struct {
		path   string
		status int
		body   string
	}{
		{"/ok", 200, `{"code":0,"message":"ok","data":{"a":1}}`},
		{"/fail", 409, `{"code":409,"message":"taken","data":null}`},
		{"/raw", 200, `{"code":0,"message":"ok","data":[1,2]}`},
		{"/rule", 400, `{"code":400,"message":"lat: \"NaN\" must be a number between -90 and 90","data":null}`},
	}
	for _, tc := range tests {
		resp, err := app.Test(httptest.NewRequest("GET", tc.path, nil))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != tc.status || string(b) != tc.body || resp.Header.Get("Content-Type") != fiber.MIMEApplicationJSON {
			t.Errorf("%s: %d %s (%s), want %d %s", tc.path, resp.StatusCode, b, resp.Header.Get("Content-Type"), tc.status, tc.body)
		}
	}
}

func TestStatus(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want int
	}{
		{wire.BodyTooLarge(10), 413},
		{wire.ValidateState(nil), 400},
		{wire.BadParam("x", "bad"), 400},
		{fmt.Errorf("context: %w", wire.BodyTooLarge(10)), 413},
		{io.EOF, 0},
	} {
		if got := Status(tc.err); got != tc.want {
			t.Errorf("Status(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}
