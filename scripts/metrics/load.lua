-- wrk script for scripts/metrics_picture.sh: alternates two users' tokens (TOKEN_A,
-- TOKEN_B from the environment) and paces each connection (DELAY_MS between its
-- requests), so the run loads the proxy without taking a shared machine's cores.
local tokens = { os.getenv("TOKEN_A"), os.getenv("TOKEN_B") }
local delay_ms = tonumber(os.getenv("DELAY_MS") or "5")
local n = 0

request = function()
  n = n + 1
  local headers = {
    ["Authorization"] = tokens[(n % 2) + 1],
    ["stream-auth-type"] = "jwt",
  }
  return wrk.format("GET", wrk.path, headers)
end

delay = function()
  return delay_ms
end
