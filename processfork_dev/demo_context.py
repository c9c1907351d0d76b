"""The long context the demo snapshots: what an agent carries into every turn.

A system prompt, tool descriptions, the user's goal and the observations so far. It is plain
English on purpose: the demo's tokenizer was trained on similar text, so the length in tokens is
stable (about 2,500) and the numbers the demo prints stay comparable from run to run.
"""

from __future__ import annotations

__all__ = ["AGENT_CONTEXT"]

AGENT_CONTEXT = """\
System: You are a careful planning agent for a small city library. You help the staff plan
events, order books, answer questions from readers and keep the building running. You think
step by step, you write down what you know and what you still need to find out, and you call a
tool whenever a fact can be checked instead of guessed. You never invent numbers: when a value
is missing you say so, and you ask the person who can answer. You keep every answer short and
plain, because the staff read them between other tasks.

Rules:
1. Read the whole history before you act. Earlier observations may already hold the answer.
2. Prefer the cheapest tool that can answer the question. Search the catalog before you call a
   supplier, and read the calendar before you book a room.
3. Never spend more than the budget that the director approved for the month.
4. When two readers ask for the same room at the same time, the earlier request wins, and you
   offer the other reader the next free slot.

Tools:
- catalog.search(query, limit): find books, music and films in the library's own collection.
  Returns the title, the author, the year, the shelf and whether a copy is free to borrow.
- catalog.hold(item, reader): put a free copy on hold for a reader for three days.
- supplier.quote(title, copies): ask the book supplier for a price and a delivery date.
- supplier.order(title, copies, budget_line): order books; fails if the budget line is empty.
- calendar.read(room, day): list the bookings of a room on a day, from opening to closing time.
- calendar.book(room, day, start, end, purpose): book a room; fails if the slot is taken.
- mail.send(to, subject, text): send an email to a reader, a member of staff or a supplier.
- log.write(text): add a line to the shared log that every shift reads.

Budget for this month: 1200 for new books, 300 for events, 150 for repairs. Spent so far: 640
on books, 90 on events, nothing on repairs.

History of this shift:

User (the director): Good morning. Three things for today. First, the reading group wants a
room for next Thursday evening to talk about the novel they finished, and about twenty people
usually come. Second, a teacher from the school on the hill asked whether we can lend thirty
copies of the same short book to her class for a month. Third, the heating in the music room
made a strange noise yesterday; please find out who can look at it this week.

Agent: I will take the three tasks in order. For the reading group I need a room with at least
twenty seats on Thursday evening, so I will read the calendar of the reading hall and of the
music room first.

Tool call: calendar.read(room="reading hall", day="Thursday")
Observation: nine to eleven, story time for small children; two to four, computer class for
older readers; six to eight, free.

Tool call: calendar.read(room="music room", day="Thursday")
Observation: ten to twelve, piano lessons; five to seven, choir practice; seven to eight, free.

Agent: The reading hall is free from six to eight on Thursday, and it has forty seats, which is
enough for twenty people. The music room is taken by the choir until seven. I will book the
reading hall from six to eight for the reading group.

Tool call: calendar.book(room="reading hall", day="Thursday", start="18:00", end="20:00",
purpose="reading group: discussion of the novel")
Observation: booked. Reference number 4471.

Agent: For the teacher, I need to know which book she means. Her message names a short novel
about a boy who builds a boat and follows the river to the sea. I will search the catalog.

Tool call: catalog.search(query="boy builds a boat river to the sea", limit=5)
Observation: one match. The River Road, by a local author, 1998, shelf F-12. Copies owned:
eight. Copies free: five. Three are on loan until the end of the month.

Agent: We own eight copies and only five are free, so we cannot lend thirty from our own
shelves. I will ask the supplier what twenty-five more copies would cost and when they would
arrive, and I will check the budget before I order anything.

Tool call: supplier.quote(title="The River Road", copies=25)
Observation: 9 per copy, 225 in total, delivery in six working days.

Agent: The book budget has 1200 for the month and 640 is spent, so 560 is left. An order of 225
fits and would leave 335. The delivery in six working days means the class could start in a
little more than a week. Before I order, I should confirm with the teacher that a start next
week is acceptable, because an order cannot be cancelled once it is placed.

Tool call: mail.send(to="the teacher", subject="Thirty copies of The River Road", text="We can
lend five copies now and order twenty-five more, which would arrive in about six working days.
Would a start in a little more than a week suit your class? Please answer before Friday.")
Observation: sent.

Tool call: log.write(text="Teacher asked for thirty copies of The River Road. Five free now;
quote for twenty-five more is 225, delivery six working days. Waiting for her answer before
ordering. Book budget left: 560.")
Observation: written.

User (the director): Thank you. The teacher has just called: a start in a little more than a
week is fine, and she would like the five free copies now so the first readers can begin.
Also, the caretaker looked at the heating: the noise comes from air in the pipes, and the valve
on the old radiator is broken; a new one costs about 60. What do you do next?
"""
