-- The marker and the server's clock, so its age is measured on one clock for all workers.
local raw = redis.pcall('GET', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if type(raw) == 'table' then return {'\0unreadable', now} end
if not raw then return {false, now} end
return {raw, now}
