package outpost.authz_test

import data.outpost.authz

# Fixtures: a device in region "north" owned by "o-owner".
device := {"kind": "device", "id": "d1", "owners": ["o-owner"], "region": "north", "tags": {"floor": "2"}}

req(user, action, resource) := {"user": user, "action": action, "resource": resource}

admin := {"openid": "o-admin", "roles": ["admin"], "regions": []}

op_north := {"openid": "o-op", "roles": ["operator"], "regions": ["north", "east"]}

op_south := {"openid": "o-op2", "roles": ["operator"], "regions": ["south"]}

owner_viewer := {"openid": "o-owner", "roles": ["viewer"], "regions": []}

other_viewer := {"openid": "o-other", "roles": ["viewer"], "regions": ["north"]}

no_role := {"openid": "o-nobody", "roles": [], "regions": []}

user_res := {"kind": "user", "id": "o-someone", "owners": [], "region": "", "tags": {}}

edge_res := {"kind": "edge", "id": "edge-1", "owners": [], "region": "north", "tags": {}}

device_actions := ["device.list", "device.read", "device.write_desired", "device.write_meta"]

allowed(user, action, resource) if authz.allow with input as req(user, action, resource)

why(user, action, resource) := r if {
	r := authz.reason with input as req(user, action, resource)
}

# --- admin: everything -------------------------------------------------------

test_admin_device_actions if {
	every a in device_actions { allowed(admin, a, device) }
}

test_admin_user_write if allowed(admin, "user.write", user_res)

test_admin_edge_read if allowed(admin, "edge.read", edge_res)

test_admin_reason_names_role if contains(why(admin, "device.write_meta", device), "admin")

test_admin_device_without_region if allowed(admin, "device.write_desired", object.union(device, {"region": ""}))

# --- operator: devices in their regions, read + write desired -----------------

test_operator_in_region_read_list_write if {
	allowed(op_north, "device.read", device)
	allowed(op_north, "device.list", device)
	allowed(op_north, "device.write_desired", device)
}

test_operator_out_of_region_denied if {
	not allowed(op_south, "device.read", device)
	not allowed(op_south, "device.list", device)
	not allowed(op_south, "device.write_desired", device)
	why(op_south, "device.read", device) == `operator may only act on devices in their regions; device "d1" is in region "north"`
}

test_operator_device_without_region_denied if {
	d := object.union(device, {"region": ""})
	not allowed(op_north, "device.read", d)
	contains(why(op_north, "device.read", d), "has no region")
}

test_operator_write_meta_denied if {
	not allowed(op_north, "device.write_meta", device)
	why(op_north, "device.write_meta", device) == "only admins may change a device's owners, region or tags"
}

test_operator_user_write_denied if {
	not allowed(op_north, "user.write", user_res)
	why(op_north, "user.write", user_res) == "only admins may change user roles and regions"
}

test_operator_edge_read if allowed(op_north, "edge.read", edge_res)

test_operator_owner_without_region_role_denied if {
	# Ownership does not widen an operator's reach; only a viewer role does.
	op := object.union(op_south, {"openid": "o-owner"})
	not allowed(op, "device.read", device)
}

# --- viewer: devices they own, read only --------------------------------------

test_viewer_owner_read_list if {
	allowed(owner_viewer, "device.read", device)
	allowed(owner_viewer, "device.list", device)
}

test_viewer_owner_write_denied if {
	not allowed(owner_viewer, "device.write_desired", device)
	contains(why(owner_viewer, "device.write_desired", device), "viewer may only read devices")
	not allowed(owner_viewer, "device.write_meta", device)
	why(owner_viewer, "device.write_meta", device) == "only admins may change a device's owners, region or tags"
}

test_viewer_not_owner_denied if {
	# Regions mean nothing to a viewer.
	not allowed(other_viewer, "device.read", device)
	not allowed(other_viewer, "device.list", device)
	why(other_viewer, "device.read", device) == "viewer may only read devices they own"
}

test_viewer_user_write_denied if not allowed(owner_viewer, "user.write", user_res)

test_viewer_edge_read if allowed(owner_viewer, "edge.read", edge_res)

# --- combined roles: either role suffices; reasons from each ------------------

test_operator_and_viewer if {
	u := {"openid": "o-owner", "roles": ["viewer", "operator"], "regions": ["south"]}
	allowed(u, "device.read", device)
	not allowed(u, "device.write_desired", device)
	r := why(u, "device.write_desired", device)
	contains(r, "operator may only act on devices in their regions")
	contains(r, "viewer may only read devices;")
}

# --- no role, unknown roles, unauthenticated, malformed -----------------------

test_no_role if {
	every a in device_actions { not allowed(no_role, a, device) }
	not allowed(no_role, "user.write", user_res)
	why(no_role, "device.read", device) == "you have no role on this edge; ask an admin to grant you one"
}

test_any_authenticated_user_may_read_edge if {
	allowed(no_role, "edge.read", edge_res)
	allowed({"openid": "o-x", "roles": ["superuser"], "regions": []}, "edge.read", edge_res)
}

test_unknown_role_is_no_role if {
	u := {"openid": "o-x", "roles": ["superuser", "root"], "regions": ["north"]}
	not allowed(u, "device.read", device)
	why(u, "device.read", device) == "you have no role on this edge; ask an admin to grant you one"
}

test_unauthenticated_denied if {
	anon := {"openid": "", "roles": ["admin"], "regions": []}
	not allowed(anon, "edge.read", edge_res)
	not allowed(anon, "device.read", device)
	why(anon, "device.read", device) == "request is not authenticated"
}

test_unknown_action_denied if {
	not allowed(admin, "device.delete", device)
	why(admin, "device.delete", device) == `unknown action "device.delete"`
}

test_kind_mismatch_denied if {
	not allowed(admin, "device.read", user_res)
	why(admin, "device.read", user_res) == `action device.read applies to device resources, not "user"`
}

test_empty_input_denied if {
	not authz.allow with input as {}
	authz.reason == "request is not authenticated" with input as {}
}

test_missing_fields_denied if {
	not authz.allow with input as {"user": {"openid": "o-owner"}, "action": "device.read", "resource": {"kind": "device"}}
}

test_allow_reason_lists_roles if {
	why(op_north, "device.read", device) == "allowed as operator"
	why(admin, "edge.read", edge_res) == "allowed as admin, authenticated"
}

# --- rules and alerts ----------------------------------------------------------

rule_res := {"kind": "rule", "id": "hot", "owners": [], "region": "", "tags": {}}

test_rule_write_admin_only if {
	allowed(admin, "rule.write", rule_res)
	not allowed(op_north, "rule.write", rule_res)
	why(op_north, "rule.write", rule_res) == "only admins may read and change rules"
	not allowed(owner_viewer, "rule.write", rule_res)
}

test_alert_read_follows_device_read if {
	allowed(admin, "alert.read", device)
	allowed(op_north, "alert.read", device)
	not allowed(op_south, "alert.read", device)
	allowed(owner_viewer, "alert.read", device)
	not allowed(other_viewer, "alert.read", device)
	not allowed(no_role, "alert.read", device)
}

test_alert_ack_operator_in_region if {
	allowed(admin, "alert.ack", device)
	allowed(op_north, "alert.ack", device)
	not allowed(op_south, "alert.ack", device)
	contains(why(op_south, "alert.ack", device), "operator may only act on devices in their regions")
	not allowed(owner_viewer, "alert.ack", device)
	contains(why(owner_viewer, "alert.ack", device), "viewer may only read alerts")
}

test_rule_actions_kinds if {
	not allowed(admin, "rule.write", device)
	not allowed(admin, "alert.ack", rule_res)
}
