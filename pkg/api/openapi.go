package api

import (
	_ "embed"

	"github.com/gofiber/fiber/v2"
)

// openAPI is the OpenAPI 3 document of this API, served as is at
// /api/v1/openapi.json. TestOpenAPIMatchesRoutes holds it to the routes:
// every route documented, every documented operation a route, and each
// operation's security what the server enforces.
//
//go:embed openapi.json
var openAPI []byte

func (s *Server) openapi(c *fiber.Ctx) error {
	revalidate(c)
	c.Set(fiber.HeaderContentType, fiber.MIMEApplicationJSON)
	return c.Send(openAPI)
}
