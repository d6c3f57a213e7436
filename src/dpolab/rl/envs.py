"""Example Markov processes and MDPs, and Gymnasium toy-text conversion.

* :func:`student_mrp`, :func:`student_mdp`: David Silver's RL course, lecture 2.
* :func:`gridworld_4x4`: Sutton & Barto 2018, Example 4.1.
* :func:`random_walk`: Sutton & Barto Example 6.2 (A..E); :func:`jump_random_walk`: Example 9.1
  (the 1000-state walk, any size) for state aggregation.
* :func:`qtable_gridworld`: our concrete version of the seed deck's Q-table robot world.
* :func:`from_gymnasium`: any Gymnasium toy-text environment with a transition table ``env.unwrapped.P``.
* :func:`load_mdp_file` (from :mod:`dpolab.rl.mdp_file`): a YAML/JSON description (see
  examples/student_mdp.yaml).
"""

from __future__ import annotations

import numpy as np

from dpolab.rl.mdp import ATOL, MDP, MRP, MDPError
from dpolab.rl.mdp_file import load_mdp_file, mdp_from_dict  # noqa: F401 -- part of this module's API


def student_mrp(gamma: float = 0.9) -> MRP:
    """Silver's Student MRP; R(s) is the reward on leaving s. With gamma = 0.9: v(Class1) = -5.013, ..."""
    states = ["Class1", "Class2", "Class3", "Pass", "Pub", "Facebook", "Sleep"]
    ix = {s: i for i, s in enumerate(states)}
    edges = {"Class1": {"Class2": 0.5, "Facebook": 0.5}, "Class2": {"Class3": 0.8, "Sleep": 0.2},
             "Class3": {"Pass": 0.6, "Pub": 0.4}, "Pass": {"Sleep": 1.0},
             "Pub": {"Class1": 0.2, "Class2": 0.4, "Class3": 0.4},
             "Facebook": {"Facebook": 0.9, "Class1": 0.1}, "Sleep": {"Sleep": 1.0}}
    P = np.zeros((7, 7))
    for s, row in edges.items():
        for t, p in row.items():
            P[ix[s], ix[t]] = p
    R = [-2, -2, -2, 10, 1, -1, 0]
    return MRP(P, R, gamma, states, initial=ix["Class1"])


STUDENT_MDP = {  # state -> action -> (reward, {next: prob}); Sleep is terminal
    "Facebook": {"facebook": (-1, {"Facebook": 1.0}), "quit": (0, {"Class1": 1.0})},
    "Class1": {"facebook": (-1, {"Facebook": 1.0}), "study": (-2, {"Class2": 1.0})},
    "Class2": {"sleep": (0, {"Sleep": 1.0}), "study": (-2, {"Class3": 1.0})},
    "Class3": {"study": (10, {"Sleep": 1.0}), "pub": (1, {"Class1": 0.2, "Class2": 0.4, "Class3": 0.4})},
}


def student_mdp(gamma: float = 1.0) -> MDP:
    """Silver's Student MDP (two actions per state). With gamma = 1: v* = 6, 6, 8, 10, 0."""
    return mdp_from_dict({"gamma": gamma, "states": ["Facebook", "Class1", "Class2", "Class3", "Sleep"],
                          "initial": "Class1",
                          "transitions": {s: {a: {"reward": r, "next": nxt} for a, (r, nxt) in acts.items()}
                                          for s, acts in STUDENT_MDP.items()}})


def _grid_moves(rows: int, cols: int, s: int) -> list[int]:
    """Next cell for actions up, down, right, left; moving off the grid leaves the cell unchanged."""
    r, c = divmod(s, cols)
    out = []
    for dr, dc in ((-1, 0), (1, 0), (0, 1), (0, -1)):
        rr, cc = r + dr, c + dc
        out.append(rr * cols + cc if 0 <= rr < rows and 0 <= cc < cols else s)
    return out


def gridworld_4x4(gamma: float = 1.0) -> MDP:
    """Sutton & Barto Example 4.1: 4x4 grid, corners 0 and 15 terminal, reward -1 on every move."""
    P, R = np.zeros((16, 4, 16)), -np.ones((16, 4))
    for s in range(16):
        if s in (0, 15):
            P[s, :, s], R[s] = 1.0, 0.0
            continue
        for a, t in enumerate(_grid_moves(4, 4, s)):
            P[s, a, t] = 1.0
    return MDP(P, R, gamma, [str(i) for i in range(16)], ["up", "down", "right", "left"])


def jump_random_walk(n_states: int = 1000, max_jump: int = 100, left_reward: float = -1.0,
                     right_reward: float = 1.0, gamma: float = 1.0, names=None) -> MRP:
    """Sutton & Barto Example 9.1 generalised: states 1..n, start in the middle, jump 1..max_jump cells
    left or right uniformly; a jump past an edge ends the episode with ``left_reward``/``right_reward``.
    The two terminal states ``left`` and ``right`` come last (indices n, n+1)."""
    if n_states < 1 or max_jump < 1:
        raise MDPError("jump_random_walk needs n_states >= 1 and max_jump >= 1")
    n = n_states
    P, R = np.zeros((n + 2, n + 2)), np.zeros((n + 2, n + 2))
    p = 1.0 / (2 * max_jump)
    for s in range(n):
        for k in range(1, max_jump + 1):
            for t, rew, end in ((s - k, left_reward, n), (s + k, right_reward, n + 1)):
                if 0 <= t < n:
                    P[s, t] += p
                else:
                    P[s, end] += p
                    R[s, end] = rew
    P[n, n] = P[n + 1, n + 1] = 1.0
    names = list(names) if names is not None else [str(i + 1) for i in range(n)]
    return MRP(P, R, gamma, names + ["left", "right"], initial=n // 2)


def random_walk(gamma: float = 1.0) -> MRP:
    """Sutton & Barto Example 6.2: A..E, start C, +1 on exiting right, 0 left: v = 1/6 .. 5/6."""
    return jump_random_walk(5, 1, left_reward=0.0, right_reward=1.0, gamma=gamma, names="ABCDE")


QTABLE_GRID = ("S.M..",  # our grid (documented in docs/rl-foundations.md): S start, . blank,
               "..PM.",  # P power, M mine, E end
               "M...P",
               "..M.E")
TILE_REWARD = {"S": -1.0, ".": -1.0, "P": 1.0, "M": -100.0, "E": 100.0}


def qtable_gridworld(gamma: float = 0.9, grid: tuple[str, ...] = QTABLE_GRID) -> MDP:
    """The deck's Q-table robot world on our concrete grid.

    Deterministic moves up/down/right/left; the reward is that of the tile entered: blank or start -1 (the
    cost of a step), power +1, mine -100 (episode ends), end +100 (episode ends); bumping into the border
    costs -1 and stays. Power can be collected again on re-entry. Mines and the end are terminal states.
    """
    rows, cols = len(grid), len(grid[0])
    if any(len(r) != cols for r in grid) or any(ch not in TILE_REWARD for r in grid for ch in r):
        raise MDPError(f"grid rows must have equal length and use the tiles {''.join(TILE_REWARD)}")
    tiles = "".join(grid)
    S = rows * cols
    P, R = np.zeros((S, 4, S)), np.zeros((S, 4))
    for s in range(S):
        if tiles[s] in "ME":
            P[s, :, s] = 1.0
            continue
        for a, t in enumerate(_grid_moves(rows, cols, s)):
            P[s, a, t] = 1.0
            R[s, a] = -1.0 if t == s else TILE_REWARD[tiles[t]]
    names = [f"{r},{c}{'' if tiles[r * cols + c] == '.' else tiles[r * cols + c]}"
             for r in range(rows) for c in range(cols)]
    return MDP(P, R, gamma, names, ["up", "down", "right", "left"], initial=tiles.index("S"))


ACTION_NAMES = {"FrozenLake": ["left", "down", "right", "up"], "CliffWalking": ["up", "right", "down", "left"],
                "Taxi": ["south", "north", "east", "west", "pickup", "dropoff"]}


def from_gymnasium(env_id: str, gamma: float, *, need_start: bool = True, **kwargs) -> MDP:
    """The MDP of a Gymnasium toy-text environment, from its table ``env.unwrapped.P[s][a]`` of
    ``(prob, next_state, reward, terminated)`` entries.

    Episodes end on ``terminated``: the states entered that way become absorbing with no further reward.
    If such a state is also entered without termination (e.g. Taxi), an extra absorbing state
    ``terminal`` (last index) receives the terminating transitions instead.

    The start distribution is the environment's ``initial_state_distrib``. One that is none (a
    FrozenLake map without an 'S' tile: 0/0) is an error naming that, unless ``need_start`` is False
    (solving, which never samples): then the MDP gets the default start distribution.
    """
    try:
        import gymnasium as gym
    except ImportError:  # pragma: no cover - gymnasium is a dependency
        raise MDPError("gymnasium is not installed") from None
    try:
        with np.errstate(invalid="ignore", divide="ignore"):  # FrozenLake without 'S' divides 0 by 0
            env = gym.make(env_id, **kwargs)
    except gym.error.Error as err:
        raise MDPError(f"unknown environment {env_id!r}: {err}") from None
    except TypeError as err:
        raise MDPError(f"bad keyword arguments for {env_id}: {err}") from None
    except Exception as err:  # a value the environment rejects (e.g. map_name=9x9: its own KeyError)
        raise MDPError(f"--env-kwargs {kwargs}: {env_id} refused them: {type(err).__name__}: {err}") from None
    try:
        u = env.unwrapped
        table = getattr(u, "P", None)
        if not isinstance(table, dict) or not hasattr(u.observation_space, "n") or not hasattr(u.action_space, "n"):
            raise MDPError(f"{env_id} is not a toy-text environment with a transition table (env.unwrapped.P)")
        S, A = int(u.observation_space.n), int(u.action_space.n)
        entries = [(s, a, float(p), int(t), float(r), bool(done))
                   for s in range(S) for a in range(A) for p, t, r, done in table[s][a]]
        initial = getattr(u, "initial_state_distrib", None)
    finally:
        env.close()
    ends = {t for *_, t, _, done in entries if done}
    extra = bool(ends & {t for *_, t, _, done in entries if not done})
    n = S + 1 if extra else S
    P, PR = np.zeros((n, A, n)), np.zeros((n, A, n))
    for s, a, p, t, r, done in entries:
        t = S if (done and extra) else t
        P[s, a, t] += p
        PR[s, a, t] += p * r
    R = np.divide(PR, P, out=np.zeros_like(PR), where=P > 0)
    for t in ({S} if extra else ends):
        P[t], R[t] = 0.0, 0.0
        P[t, :, t] = 1.0
    if initial is not None:
        initial = np.asarray(initial, dtype=np.float64)
        if not (np.isfinite(initial).all() and (initial >= 0).all() and abs(initial.sum() - 1.0) <= ATOL):
            if need_start:
                raise MDPError(f"{env_id}: the environment has no start distribution (initial_state_distrib "
                               "is not one" + (": the map has no 'S' start tile)" if base_id(env_id) == "FrozenLake"
                                               else ")"))
            initial = None
    if initial is not None and extra:
        initial = np.append(initial, 0.0)
    names = [str(i) for i in range(S)] + (["terminal"] if extra else [])
    base = base_id(env_id)
    actions = ACTION_NAMES.get(base) if len(ACTION_NAMES.get(base, [])) == A else None
    return MDP(P, R, gamma, names, actions, initial=initial)


def base_id(env_id: str) -> str:
    """``FrozenLake`` of ``FrozenLake-v1`` (and of ``module:FrozenLake-v1``)."""
    return env_id.rpartition(":")[2].split("-")[0]


BUILTIN_MDPS = {"student-mdp": student_mdp, "gridworld-4x4": gridworld_4x4, "qtable-gridworld": qtable_gridworld}
BUILTIN_MRPS = {"student-mrp": student_mrp, "random-walk": random_walk,
                "random-walk-100": lambda gamma=1.0: jump_random_walk(100, 10, gamma=gamma)}


BOOL_ENV_KWARGS = ("is_slippery",)  # the documented boolean kwargs (a truthy text would pass as true)


def parse_env_kwargs(text: str) -> dict:
    """``"is_slippery=false,map_name=8x8"`` -> ``{"is_slippery": False, "map_name": "8x8"}`` (YAML values;
    commas inside brackets or quotes belong to the value: ``desc=[SFF,FHF,FFG]``)."""
    import yaml

    out = {}
    for item in filter(None, (x.strip() for x in _split_commas(text or ""))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MDPError(f"--env-kwargs: expected key=value, got {item!r}")
        if key in out:
            raise MDPError(f"--env-kwargs: {key!r} is given twice")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as err:
            first = str(err).strip().splitlines()[0]
            raise MDPError(f"--env-kwargs: cannot read the value of {key!r} ({value!r}): {first}") from None
        if key in BOOL_ENV_KWARGS and not isinstance(out[key], bool):
            raise MDPError(f"--env-kwargs: {key} must be true or false, got {out[key]!r}")
    return out


def _split_commas(text: str) -> list[str]:
    """``text`` split on the commas outside brackets and quotes. A quote opens only where a YAML
    quoted scalar can start (after ``=``, ``[``, ``{``, ``,``, ``:``), so ``it's`` stays plain text."""
    items, depth, quote, start, prev, i = [], 0, "", 0, "=", 0
    while i < len(text):
        ch = text[i]
        if quote:
            if (ch == "\\" and quote == '"') or (ch == quote == "'" and text[i + 1:i + 2] == "'"):
                i += 1  # an escaped character (\" or ''), perhaps the quote
            elif ch == quote:
                quote = ""
        elif ch in "'\"" and prev in "=[{,:":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
        if not ch.isspace():
            prev = ch
        i += 1
    return [*items, text[start:]]


def make_model(env: str | None = None, mdp_file: str | None = None, gamma: float | None = None,
               env_kwargs: str = "", default_gym_gamma: float = 0.9, need_start: bool = True) -> MRP | MDP:
    """A built-in MRP/MDP by name, an MDP file, or a Gymnasium toy-text environment id
    (``need_start``: see :func:`from_gymnasium`)."""
    if (env is None) == (mdp_file is None):
        raise MDPError("give exactly one of --env or --mdp")
    if mdp_file is not None:
        return load_mdp_file(mdp_file, gamma)
    kwargs = parse_env_kwargs(env_kwargs)
    for table in (BUILTIN_MDPS, BUILTIN_MRPS):
        if env in table:
            if kwargs:
                raise MDPError(f"--env-kwargs applies to Gymnasium environments, not built-in '{env}'")
            return table[env]() if gamma is None else table[env](gamma=gamma)
    if "-v" not in env:
        names = ", ".join([*BUILTIN_MDPS, *BUILTIN_MRPS])
        raise MDPError(f"unknown environment {env!r}: built-ins are {names}, or a Gymnasium toy-text id "
                       "such as FrozenLake-v1")
    return from_gymnasium(env, default_gym_gamma if gamma is None else gamma, need_start=need_start, **kwargs)
