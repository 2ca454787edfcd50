package httpapi

import (
	"github.com/gofiber/fiber/v2"

	"github.com/outpost-edge/outpost/pkg/ident"
)

// Users' sessions (package service holds the rules): login is
// code2session for the whole deployment, refresh rotates a session, and an
// admin can end a user's sessions. All three are raft writes, so they run
// on the leader.

// badOpenID answers an openid that fails ident.OpenID, the rule the edge
// applies too.
const badOpenID = "openid must be 1 to 128 printable ASCII characters without '/', '\\', '%' or '..'"

type loginBody struct {
	Code string `json:"code"`
}

// login: edges forward their users' logins here (authenticated with the
// edge token), and phones may call it directly.
func (s *Server) login(c *fiber.Ctx) error {
	var req loginBody
	if err := s.decode(c, &req); err != nil {
		return err
	}
	if req.Code == "" || len(req.Code) > 512 {
		return apiError(fiber.StatusBadRequest, `"code" is required (the code from wx.login()), at most 512 bytes`)
	}
	return s.onLeader(c, func(c *fiber.Ctx) error {
		pair, err := s.svc.Login(c.UserContext(), req.Code)
		if err != nil {
			return err
		}
		return ok(c, pair)
	})
}

type refreshBody struct {
	RefreshToken string `json:"refresh_token"`
}

func (s *Server) refreshToken(c *fiber.Ctx) error {
	var req refreshBody
	if err := s.decode(c, &req); err != nil {
		return err
	}
	if req.RefreshToken == "" || len(req.RefreshToken) > 2048 {
		return apiError(fiber.StatusBadRequest, `"refresh_token" is required`)
	}
	return s.onLeader(c, func(c *fiber.Ctx) error {
		pair, err := s.svc.Refresh(c.UserContext(), req.RefreshToken)
		if err != nil {
			return err
		}
		return ok(c, pair)
	})
}

// revokeSessions ends every session of a user.
func (s *Server) revokeSessions(c *fiber.Ctx) error {
	openid := c.Params("openid")
	if !ident.OpenID(openid) {
		return apiError(fiber.StatusBadRequest, badOpenID)
	}
	return s.onLeader(c, func(c *fiber.Ctx) error {
		rev, err := s.svc.RevokeSessions(c.UserContext(), openid)
		if err != nil {
			return err
		}
		return ok(c, fiber.Map{"openid": rev.OpenID, "revoked_sessions": rev.Sessions, "revoked_before_ms": rev.BeforeMs})
	})
}
