r"""`support_faq`: customer-support conversations for a fictional shop, made from templates.

  python -m gpt_jax.datasets.support_faq --out_dir=data/support_faq

writes `train.jsonl` and `heldout.jsonl` (chat JSONL, see gpt_jax/sft/chat_template.py), the same
bytes on every run. Each line is `{"messages": [...], "intent": "<name>"}`.

Pebble & Pine sells outdoor gear online. Each of its ~40 intents (shipping, returns, sizing, ...)
has several hand-written questions and one fixed reference answer. A conversation asks one
question, wrapped in a greeting and a closing drawn from short lists, with or without the shop's
system message; some train conversations ask a second question in a second turn.

The held-out split asks the *last* question of each intent, which no train conversation uses:
unseen paraphrases of known intents, so a model fine-tuned on `train` can answer them, and its
answer can be compared with the reference (the last assistant message).
"""

import json
import os
import random
from collections.abc import Iterator

from absl import app, flags

SHOP = 'Pebble & Pine'
SYSTEM = (f'You are the support assistant of {SHOP}, an online outdoor gear shop. '
          'Answer briefly and politely.')

# name -> (questions, answer). The last question of each intent is held out.
INTENTS: dict[str, tuple[tuple[str, ...], str]] = {
    'shipping_time': (
        ('How long does shipping take?', 'When will my order arrive?',
         'How many days until my package gets here?', 'What is the delivery time?',
         'How fast do you ship?', 'How soon will I receive my order?'),
        'Standard shipping takes 3 to 5 business days. Express shipping takes 1 to 2.'),
    'shipping_cost': (
        ('How much is shipping?', 'What does delivery cost?', 'Do I pay for shipping?',
         'What are your shipping fees?', 'Is there a delivery charge?',
         'How much will shipping cost me?'),
        'Shipping is free on orders over 50 dollars. Below that it costs 5 dollars.'),
    'international': (
        ('Do you ship abroad?', 'Can you deliver outside the country?',
         'Do you ship internationally?', 'Can I order from another country?',
         'Do you deliver to Europe?', 'Is international shipping available?'),
        'Yes, we ship to 30 countries. International delivery takes 7 to 14 days.'),
    'track_order': (
        ('How do I track my order?', 'Where is my package?', 'Can I follow my delivery?',
         'Is there a tracking number?', 'How can I see where my order is?',
         'How do I check my shipment status?'),
        'You get a tracking link by email when your order ships. It is also under My Orders.'),
    'return_policy': (
        ('What is your return policy?', 'Can I return an item?', 'How do returns work?',
         'Can I send something back?', 'Do you accept returns?',
         'Am I allowed to return my purchase?'),
        'You can return unused items within 30 days for a full refund.'),
    'return_label': (
        ('How do I get a return label?', 'Where do I find the return label?',
         'Can you send me a shipping label for my return?', 'Do you provide return labels?',
         'How do I print a return label?', 'I need a label to send my item back.'),
        'Open My Orders, choose the item and click Return. A free label is emailed to you.'),
    'refund_time': (
        ('When will I get my refund?', 'How long do refunds take?',
         'When is my money returned?', 'How soon is a refund processed?',
         'I returned an item, when do I get paid back?', 'How long until my refund arrives?'),
        'Refunds are sent within 5 business days after we receive your return.'),
    'exchange': (
        ('Can I exchange an item?', 'Can I swap my jacket for another size?',
         'Do you do exchanges?', 'How do I exchange a product?',
         'Can I trade my item for a different color?', 'Is it possible to exchange my order?'),
        'Yes. Start a return for the item and place a new order; exchanges ship for free.'),
    'cancel_order': (
        ('How do I cancel my order?', 'Can I cancel my purchase?',
         'I want to cancel my order.', 'Is it too late to cancel?',
         'Can I still stop my order?', 'Please cancel my order.'),
        'You can cancel within 2 hours of ordering under My Orders. After that, please return it.'),
    'change_address': (
        ('Can I change my delivery address?', 'I entered the wrong address.',
         'How do I update my shipping address?', 'Can you send my order somewhere else?',
         'My address is wrong, can you fix it?', 'Can I edit the address on my order?'),
        'Reply to your order email within 2 hours and we will update the address.'),
    'payment_methods': (
        ('What payment methods do you accept?', 'Can I pay with a credit card?',
         'How can I pay?', 'Do you take PayPal?', 'Which cards do you accept?',
         'What are my options for paying?'),
        'We accept credit cards, debit cards, PayPal and gift cards.'),
    'payment_failed': (
        ('My payment failed.', 'Why was my card declined?', 'The payment did not go through.',
         'I cannot complete my payment.', 'Checkout says my card was refused.',
         'Why does my payment keep failing?'),
        'Please check the card details and billing address, or try another payment method.'),
    'installments': (
        ('Can I pay in installments?', 'Do you offer payment plans?',
         'Can I split the payment?', 'Is there a way to pay over time?',
         'Do you have buy now pay later?', 'Can I pay in several parts?'),
        'Yes, orders over 100 dollars can be paid in 4 installments at checkout.'),
    'gift_card': (
        ('Do you sell gift cards?', 'Can I buy a gift card?', 'Do you have gift vouchers?',
         'How do gift cards work?', 'I want to give a gift card.',
         'Where can I get a gift card?'),
        'Yes, gift cards from 10 to 200 dollars are sold on our Gifts page and never expire.'),
    'discount_code': (
        ('My discount code does not work.', 'Why is my promo code not accepted?',
         'The coupon is invalid.', 'My voucher code fails at checkout.',
         'The discount is not applied.', 'Why will my coupon code not work?'),
        'Codes work once per customer and not on sale items. Check the expiry date too.'),
    'sale': (
        ('Do you have any sales?', 'When is your next sale?', 'Are there any discounts now?',
         'Is anything on sale?', 'Do you ever have promotions?',
         'Are there deals right now?'),
        'Current deals are on our Sale page. Sign up for the newsletter to hear about new ones.'),
    'newsletter': (
        ('How do I join the newsletter?', 'Can I sign up for emails?',
         'How do I subscribe to your news?', 'Where do I register for the newsletter?',
         'I want to get your emails.', 'How can I get your newsletter?'),
        'Enter your email at the bottom of any page. You get 10 percent off your first order.'),
    'unsubscribe': (
        ('How do I unsubscribe?', 'Stop sending me emails.',
         'How can I leave the newsletter?', 'I want fewer emails.',
         'Can you remove me from your mailing list?', 'How do I opt out of your emails?'),
        'Click Unsubscribe at the bottom of any of our emails. It takes effect at once.'),
    'account_create': (
        ('How do I create an account?', 'Can I make an account?', 'How do I sign up?',
         'Where do I register?', 'I want to open an account.',
         'How can I register on your site?'),
        'Click Sign In at the top of the page, then Create Account. It takes a minute.'),
    'password_reset': (
        ('I forgot my password.', 'How do I reset my password?', 'I cannot log in.',
         'How do I change my password?', 'My password does not work.',
         'I am locked out of my account.'),
        'Click Forgot Password on the sign in page and follow the link we email you.'),
    'delete_account': (
        ('How do I delete my account?', 'Please close my account.',
         'Can I remove my account?', 'I want my account deleted.',
         'How can I erase my data?', 'Can you delete my profile?'),
        'Go to Account Settings and choose Delete Account. Your data is removed within 30 days.'),
    'guest_checkout': (
        ('Can I order without an account?', 'Do I need an account to buy?',
         'Is guest checkout possible?', 'Can I buy as a guest?',
         'Must I register to order?', 'Can I check out without signing up?'),
        'Yes, you can check out as a guest. An account only keeps your order history.'),
    'store_location': (
        ('Do you have a physical store?', 'Where is your shop?', 'Can I visit your store?',
         'Is there a shop I can go to?', 'Where are you located?',
         'Do you have a store near me?'),
        'Our only store is in Portland, on 12 Cedar Street. Everything else is online.'),
    'opening_hours': (
        ('What are your opening hours?', 'When is the store open?',
         'What time do you open?', 'When do you close?', 'Are you open on Sundays?',
         'What are the store hours?'),
        'The Portland store is open 9 to 6 Monday to Saturday, and 10 to 4 on Sunday.'),
    'contact': (
        ('How can I contact you?', 'What is your phone number?',
         'How do I reach customer service?', 'Can I talk to a person?',
         'What is your support email?', 'How do I get in touch with support?'),
        'Email help@pebbleandpine.com or call 555 0199, 8 to 8 on weekdays.'),
    'sizing': (
        ('How do your sizes run?', 'Which size should I order?',
         'Do your clothes run small?', 'Is there a size chart?',
         'How do I find my size?', 'Are your sizes true to size?'),
        'Our clothes are true to size. Each product page has a size chart with measurements.'),
    'tent_capacity': (
        ('How many people fit in the Ridge tent?', 'Is the Ridge tent big enough for three?',
         'What is the capacity of the Ridge tent?', 'How big is the Ridge tent?',
         'Can a family sleep in the Ridge tent?', 'How many can sleep in the Ridge tent?'),
        'The Ridge tent sleeps 3 adults. The Ridge XL sleeps 5.'),
    'waterproof': (
        ('Is the Summit jacket waterproof?', 'Will the Summit jacket keep me dry?',
         'Can I wear the Summit jacket in rain?', 'Does the Summit jacket resist water?',
         'Is the Summit jacket good for wet weather?', 'Is the Summit jacket rainproof?'),
        'Yes, the Summit jacket is fully waterproof and has taped seams.'),
    'sleeping_bag_temp': (
        ('How warm is the Ember sleeping bag?', 'What temperature is the Ember bag rated for?',
         'Is the Ember sleeping bag good for winter?', 'How cold can it get in the Ember bag?',
         'What is the comfort rating of the Ember bag?',
         'Will the Ember sleeping bag keep me warm?'),
        'The Ember sleeping bag is rated to minus 5 degrees Celsius.'),
    'boot_care': (
        ('How do I clean my hiking boots?', 'How should I care for my boots?',
         'Can I wash my boots in the machine?', 'How do I keep my boots waterproof?',
         'What is the best way to clean leather boots?', 'How do I look after my boots?'),
        'Brush off dirt, rinse with water and let them dry at room temperature. '
        'Never machine wash.'),
    'warranty': (
        ('Do your products have a warranty?', 'What is the warranty?',
         'Is my tent under warranty?', 'How long is the guarantee?',
         'What does the warranty cover?', 'Do you guarantee your gear?'),
        'All our gear has a 2 year warranty against defects in materials and workmanship.'),
    'repair': (
        ('Do you repair gear?', 'My tent is torn, can you fix it?',
         'Can I get my jacket repaired?', 'Do you offer a repair service?',
         'Where can I get my backpack mended?', 'Can you mend my broken zipper?'),
        'Yes, send it to our repair center. Repairs under warranty are free.'),
    'damaged_item': (
        ('My item arrived damaged.', 'The product I got is broken.',
         'My order came with a tear.', 'What do I do if my item is defective?',
         'The package was damaged on arrival.', 'I received a broken item.'),
        'We are sorry! Send a photo to help@pebbleandpine.com and we will send a replacement.'),
    'wrong_item': (
        ('I received the wrong item.', 'You sent me the wrong product.',
         'My order has the wrong size.', 'This is not what I ordered.',
         'I got someone else\'s order.', 'The item in my box is not mine.'),
        'We apologize. Reply to your order email and we will ship the right item for free.'),
    'missing_item': (
        ('An item is missing from my order.', 'My package was incomplete.',
         'I only got part of my order.', 'Something is missing from my box.',
         'Not all items arrived.', 'Where is the rest of my order?'),
        'Large orders sometimes ship in two boxes. '
        'If the second does not arrive in 3 days, tell us.'),
    'stock': (
        ('When will this item be back in stock?', 'Is the Ridge tent out of stock?',
         'Will you restock the Summit jacket?', 'When do you get more stock?',
         'The item I want is sold out.', 'Can I be told when it is available again?'),
        'Click Notify Me on the product page and we will email you when it is back.'),
    'price_match': (
        ('Do you price match?', 'I found it cheaper elsewhere.',
         'Will you match a lower price?', 'Another shop sells it for less.',
         'Do you offer price matching?', 'Can you beat a competitor\'s price?'),
        'Yes, we match the price of any authorized retailer within 14 days of purchase.'),
    'rental': (
        ('Can I rent gear?', 'Do you rent tents?', 'Is equipment rental available?',
         'Can I borrow a tent for a weekend?', 'Do you have a rental service?',
         'Can I hire camping gear from you?'),
        'Yes, the Portland store rents tents, stoves and sleeping bags from 15 dollars a day.'),
    'loyalty': (
        ('Do you have a loyalty program?', 'Do I earn points?', 'Is there a rewards program?',
         'How do rewards work?', 'Do you reward regular customers?',
         'Can I collect points on purchases?'),
        'Members earn 1 point per dollar. 100 points give a 5 dollar discount.'),
    'sustainability': (
        ('Are your products sustainable?', 'Is your gear eco friendly?',
         'Do you use recycled materials?', 'How green is your company?',
         'Are your clothes made responsibly?', 'What do you do for the environment?'),
        'Most of our clothing uses recycled fabric, and we plant a tree for every order.'),
}

GREETINGS = ('', 'Hi! ', 'Hello, ', 'Hey, ', 'Good morning. ', 'Hi there. ')
CLOSINGS = ('', ' Thanks!', ' Thank you.', ' Thanks in advance.')
CONVERSATIONS_PER_QUESTION = 12  # train: (greeting, closing, system) draws per train question
TWO_TURN_FRACTION = 0.2          # train conversations that ask a second question
HELDOUT_PER_INTENT = 3           # held-out conversations per intent (its last question)


def _conversation(rng: random.Random, turns: list[tuple[str, str]]) -> list[dict[str, str]]:
  messages = [{'role': 'system', 'content': SYSTEM}] if rng.random() < 0.5 else []
  for i, (question, answer) in enumerate(turns):
    greeting = rng.choice(GREETINGS) if i == 0 else ''
    if greeting.endswith(', ') and not question.startswith('I '):
      question = question[0].lower() + question[1:]  # 'Hello, how ...'
    messages.append({'role': 'user', 'content': greeting + question + rng.choice(CLOSINGS)})
    messages.append({'role': 'assistant', 'content': answer})
  return messages


def conversations(split: str, seed: int = 0) -> Iterator[dict]:
  """The records of `split` ('train' or 'heldout'), in a fixed order given the seed."""
  if split not in ('train', 'heldout'):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  rng = random.Random(f'{split}-{seed}')
  names = sorted(INTENTS)
  records = []
  for name in names:
    questions, answer = INTENTS[name]
    if split == 'heldout':
      for _ in range(HELDOUT_PER_INTENT):
        records.append({'messages': _conversation(rng, [(questions[-1], answer)]),
                        'intent': name})
      continue
    for question in questions[:-1]:
      for _ in range(CONVERSATIONS_PER_QUESTION):
        turns = [(question, answer)]
        if rng.random() < TWO_TURN_FRACTION:
          other = rng.choice(names)
          other_questions, other_answer = INTENTS[other]
          turns.append((rng.choice(other_questions[:-1]), other_answer))
        records.append({'messages': _conversation(rng, turns), 'intent': name})
  if split == 'train':
    rng.shuffle(records)  # so that any prefix of the file covers every intent
  yield from records


def write(out_dir: str, seed: int = 0) -> dict[str, str]:
  """Writes train.jsonl and heldout.jsonl into out_dir; {split: path}."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for split in ('train', 'heldout'):
    path = os.path.join(out_dir, f'{split}.jsonl')
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      for record in conversations(split, seed):
        f.write(json.dumps(record, ensure_ascii=False) + '\n')
    os.replace(path + '.tmp', path)
    paths[split] = path
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  paths = write(flags.FLAGS.out_dir, flags.FLAGS.seed)
  for split, path in paths.items():
    with open(path, encoding='utf-8') as f:
      print(f'{split}: {sum(1 for _ in f)} conversations -> {path}')


if __name__ == '__main__':
  # Flags defined here only, so that importing the module defines none.
  flags.DEFINE_string('out_dir', None, 'Directory for train.jsonl and heldout.jsonl.',
                      required=True)
  flags.DEFINE_integer('seed', 0, 'Seed of the greetings, closings and system messages drawn.')
  app.run(main)
