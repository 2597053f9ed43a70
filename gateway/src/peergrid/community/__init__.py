"""The community's membership: communities, members (houses) and devices
(boards) with their secrets and keys in SQLite, and the broker's files made
from them.

Owns: registry, broker. May import: protocol. Imports no other peergrid
package."""
