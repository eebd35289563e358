-- Closing the attempt marker (`open = false`, keeping its expiry) says: the delivery
-- that posted has settled, none of its POSTs is in the air any more.
local function close_marker(key)
  local raw = redis.pcall('GET', key)
  if type(raw) ~= 'string' then return end
  local ok, m = pcall(cjson.decode, raw)
  if ok and type(m) == 'table' and m.open then
    m.open = false
    redis.call('SET', key, cjson.encode(m), 'KEEPTTL')
  end
end
