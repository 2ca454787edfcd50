// Package httpenv writes the response envelope (wire.Envelope) for the
// edge's and the cloud's Fiber servers, and maps the shared rules' sentinel
// errors to HTTP statuses, so both daemons answer a refused request with the
// same status and body. It is the only shared package that imports Fiber;
// the rules themselves stay in the pure packages (wire, lww, shadow).
package httpenv

import (
	"errors"

	"github.com/gofiber/fiber/v2"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// OK writes a 200 envelope carrying data.
func OK(c *fiber.Ctx, data any) error {
	return c.Status(fiber.StatusOK).JSON(wire.Envelope[any]{Code: 0, Message: wire.MsgOK, Data: data})
}

// Fail writes an error envelope: code is the HTTP status, data null.
func Fail(c *fiber.Ctx, status int, msg string) error {
	return c.Status(status).JSON(wire.Envelope[any]{Code: status, Message: msg, Data: nil})
}

// Status is the HTTP status for an error of the shared rules: 413 for
// wire.ErrTooLarge, 400 for wire.ErrInvalid and wire.ErrBadParam, and 0
// for any other error (the caller decides, usually 500).
func Status(err error) int {
	switch {
	case errors.Is(err, wire.ErrTooLarge):
		return fiber.StatusRequestEntityTooLarge
	case errors.Is(err, wire.ErrInvalid), errors.Is(err, wire.ErrBadParam):
		return fiber.StatusBadRequest
	}
	return 0
}

// okPrefix opens a success envelope up to its data.
const okPrefix = `{"code":0,"message":"` + wire.MsgOK + `","data":`

// AppendOK starts a success envelope in b, for hot paths that encode their
// data by hand: append the data's JSON, then SendOK.
func AppendOK(b []byte) []byte { return append(b, okPrefix...) }

// SendOK closes an envelope begun with AppendOK and sends it with 200.
func SendOK(c *fiber.Ctx, b []byte) error {
	c.Status(fiber.StatusOK)
	c.Set(fiber.HeaderContentType, fiber.MIMEApplicationJSON)
	return c.Send(append(b, '}'))
}
